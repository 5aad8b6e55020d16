"""The error kinds, re-exported for the flows: defined once in :mod:`data.errors`."""

from data.errors import TransientError, UserError, kind_of

__all__ = ["TransientError", "UserError", "kind_of"]
