"""Errors a person can act on. The CLI prints the message as one line and exits
with the error's code; anything else escaping is a bug."""


class WmgenError(Exception):
    """A runtime failure: the input was well-formed but something could not be done."""

    exit_code = 1


class UsageError(WmgenError, ValueError):
    """Bad input from the user: an option value, a config file, a prompt.

    `key` names the setting at fault (`capacity`, `top_p`, ...) when the error comes
    from a layer that does not know where the value came from (the engine speaks of
    `capacity`); whoever does know (`Settings.sources`) names the flag, variable or
    config key in front of the message."""

    exit_code = 2

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


class ModelError(WmgenError):
    """A model or tokenizer that cannot be found or loaded."""


class SessionError(WmgenError):
    """A session file that cannot be read, written or trusted."""


class OutputError(WmgenError):
    """Standard output cannot be written (a full disk, a device error)."""
