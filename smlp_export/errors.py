"""Errors the library raises on purpose.

Every error a user can cause (bad config, bad checkpoint, bad input) is an ``SMLPError`` with a
one-line message naming what is wrong. The CLI prints the message and exits non-zero; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations


def one_line(message: str) -> str:
    """``message`` with control characters escaped (a newline in a file name becomes ``\\n``), so
    an error is always one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)


class SMLPError(Exception):
    """Base class: a user-facing, one-line error."""


class ConfigError(SMLPError, ValueError):
    """An invalid ``SMLPConfig`` field or combination of fields."""


class CheckpointError(SMLPError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


class InputError(SMLPError, ValueError):
    """Model inputs out of range (sequence too long, token id outside the vocabulary, ...)."""
