"""The one exception type for user mistakes: CLIs print its message on one line and exit non-zero."""


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a run), described in one line."""
