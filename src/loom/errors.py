"""Errors Loom shows to users.

Every user-facing error names the input, the problem and the fix, so the CLI
can print ``str(err)`` and exit without a traceback.
"""

from __future__ import annotations


class LoomError(Exception):
    """Base class: a problem the user can act on."""


class RefError(LoomError):
    """A ref (``name@version``) is malformed or points at nothing."""


class NotFoundError(LoomError):
    """The named artifact, version or alias does not exist."""


class VersionExistsError(LoomError):
    """A finalized version is immutable and cannot be published again."""


class IntegrityError(LoomError):
    """Stored bytes do not match their manifest."""


class CompatibilityError(LoomError):
    """An adapter does not fit the base model it names."""


class OfflineError(LoomError):
    """A hub download was asked for but the hub cannot be reached."""
