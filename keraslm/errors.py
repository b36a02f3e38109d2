"""The one exception type for user mistakes: CLIs print its message on one line and exit non-zero."""


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a run), described in one line."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (a library's often runs to many), or its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
