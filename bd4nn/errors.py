"""The one home of the user-error types.

A ``UserError`` says that something the user gave is wrong — an argument, a file, a profile, a
setting, a database — and how to fix it. The ``bd4nn`` command prints it in one line and exits
with status 2 (``BD4NN_DEBUG=1`` shows the traceback). Every other exception is a bug and keeps
its traceback. Each module's error type derives from ``UserError`` and, where callers expect it,
from the built-in type it refines (``ValueError``, ``KeyError``).
"""

from __future__ import annotations

__all__ = ["UserError", "UnknownNameError", "BadInputError", "RegistryError"]


class UserError(Exception):
    """Something the user gave is wrong; the message says what and how to fix it."""


class UnknownNameError(UserError, KeyError):
    """A name that no registry knows (a model, an attack, a localizer, a profile ...)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BadInputError(UserError, ValueError):
    """A value or file the user gave that bd4nn cannot use (a malformed results file, a shard
    out of range, a rejected entry asked to be benchmarked ...)."""



class RegistryError(UserError, TypeError):
    """A model, attack, localizer or repair that cannot be registered: it has no name, it does
    not derive from the registry's base class, or its name is taken (``bd4nn.registry``)."""
