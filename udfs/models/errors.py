"""The two ways a model reference fails that callers tell apart from a plain ValueError."""

from __future__ import annotations


class ModelNotAvailable(RuntimeError):
    """The weights of a reference cannot be had here (not on disk, not cached, hub unreachable)."""


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint that could only be loaded by running code from it (a pickle payload)."""
