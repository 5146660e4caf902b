"""Errors a user can act on. Their message is shown as is: one line, naming what is wrong."""


class HedgerowError(Exception):
    """Bad input or configuration; the CLI prints it without a traceback, the server maps it to
    INVALID_ARGUMENT."""


class OverloadedError(HedgerowError):
    """The waiting queue is full (the server maps it to RESOURCE_EXHAUSTED)."""
