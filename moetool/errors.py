"""Errors that moetool turns into one line on stderr.

`MoetoolError` (and subclasses) mean bad usage or bad input: the CLI prints the message alone and
exits with code 2. Anything else is an internal error (exit 3, traceback with MOETOOL_DEBUG=1).
"""

from __future__ import annotations


class MoetoolError(Exception):
    """Bad usage or bad input. The message is shown as is: say what is wrong and how to fix it."""

    exit_code = 2


class BadCheckpoint(MoetoolError):
    """A checkpoint file or directory that cannot be trusted (malformed header, missing shard...)."""


class UnsupportedArchitecture(MoetoolError):
    """config.json names a model_type that moetool has no adapter for."""


class BadConfig(MoetoolError):
    """config.json is missing a field an adapter needs, or has one of the wrong type."""
