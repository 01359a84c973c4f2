"""User-facing errors.

Anything a user can cause (a bad name, a bad value, a missing folder, a corrupt file) raises a
:class:`UserError` subclass with a one-line message that says what was wrong and how to fix it.
The CLI prints that line and exits with status 2; the Python API lets it propagate.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input, not a bug in regdefense."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A bad configuration key or value."""


class PluginError(UserError):
    """An unknown, broken or conflicting defense."""


class DataError(UserError, ValueError):
    """A dataset that cannot be used as given."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for a close match, else an empty string."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> str:
    """A one-line message for an unknown name, listing the valid ones."""
    choices = sorted(choices)
    return f"unknown {kind} '{name}'{did_you_mean(name, choices)}; valid: {', '.join(choices)}"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut at ``limit`` characters; its type's name when the message is
    empty (``NotImplementedError()`` has none), so that a message built from it never fails itself."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
