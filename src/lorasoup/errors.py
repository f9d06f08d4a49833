"""Errors a user can act on.

Every error lorasoup raises for bad input is a ``LorasoupError`` whose message is one line that says
what is wrong, where (file, row, field, module) and how to fix it. The CLI prints that line and exits
non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class LorasoupError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line."""


class ConfigError(LorasoupError):
    """A config file or flag is invalid (unknown key, wrong type, value out of range)."""


class AdapterError(LorasoupError):
    """An adapter cannot be read, or uses a feature lorasoup does not support."""


class CompatibilityError(LorasoupError):
    """Adapters (or an adapter and a base model) cannot be composed together."""


class DataError(LorasoupError):
    """A dataset cannot be read or a record is malformed."""


class ModelError(LorasoupError):
    """A base model cannot be located or loaded."""
