"""The one exception type the CLI turns into a one-line message and exit code 2."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (library errors can run to pages)."""
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


class UserError(Exception):
    """Bad input from the user: a missing file, an impossible option, an unsupported model.

    The message is a single line that says what is wrong and, where it helps, what to do.
    """


class ResumableError(UserError):
    """A failure outside the user's input that leaves the run resumable (a shard download in
    the middle of a run): a resumable run keeps its finished layers (writer.StagedOutput)."""
