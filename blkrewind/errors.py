"""Errors a user can cause and understand. The CLI prints them as one line."""


class UserError(Exception):
    """A problem with the input or the environment: one line, non-zero exit."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class CorruptLog(UserError):
    """A LOG segment holds a frame that fails its checks (not a torn tail)."""

    exit_code = 3


class StoreError(UserError):
    exit_code = 4


class NotRestorable(UserError):
    """The requested point is outside what the history can rebuild exactly."""

    exit_code = 5
