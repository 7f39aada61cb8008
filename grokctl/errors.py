"""User-facing errors and the one error -> exit-code mapping (DESIGN.md §5)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_MISSING = 4


class GrokctlError(Exception):
    """An error meant for the user: one clear line, no traceback."""

    exit_code = EXIT_ERROR


class UsageError(GrokctlError):
    """Bad flag, value or combination of options."""

    exit_code = EXIT_USAGE


class IntegrityError(GrokctlError):
    """A file is corrupt, truncated, unsafe or does not match what was expected."""

    exit_code = EXIT_INTEGRITY


class UnsafePickleError(IntegrityError):
    """A checkpoint pickle asked for something a plain array pickle never needs."""


class MissingResourceError(GrokctlError):
    """No checkpoint, no tokenizer, not enough memory or disk."""

    exit_code = EXIT_MISSING
