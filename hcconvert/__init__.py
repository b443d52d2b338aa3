"""hcconvert: fewer experts in a Mixture-of-Experts checkpoint, one decoder layer at a time."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hcconvert")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
