"""Errors a person can act on. The CLI prints the message as one line and exits
with the error's code; anything else escaping is a bug."""


class WmgenError(Exception):
    """A runtime failure: the input was well-formed but something could not be done."""

    exit_code = 1


class UsageError(WmgenError):
    """Bad input from the user: an option value, a config file, a prompt."""

    exit_code = 2


class ModelError(WmgenError):
    """A model or tokenizer that cannot be found or loaded."""


class SessionError(WmgenError):
    """A session file that cannot be read, written or trusted."""
