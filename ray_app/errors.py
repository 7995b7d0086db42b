"""The one exception type whose message is meant for the user, not a traceback."""


class AppError(Exception):
    """A mistake the user can fix; the CLI prints its message alone and exits non-zero."""
