"""`python -m hcconvert`: the same as the `hcconvert` command."""

from .cli.main import console_main

if __name__ == "__main__":
    console_main()
