"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, an impossible option, an unsupported model.

    The message is a single line that says what is wrong and, where it helps, what to do.
    """
