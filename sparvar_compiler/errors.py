"""User-facing errors.

Every problem caused by input (an unknown model, a malformed schedule, a bad plan option, a tensor of the wrong
shape) raises a :class:`SparvarError` whose message names the offending field or value. The command line prints
the message and exits with status 2, without a traceback.
"""

from __future__ import annotations


class SparvarError(ValueError):
    """Base class of every error caused by bad input."""


class ModelError(SparvarError):
    """Unknown model, or a malformed model description."""


class ScheduleError(SparvarError):
    """Unknown resolution or aspect ratio, or a malformed scale schedule."""


class GpuError(SparvarError):
    """Unknown GPU name."""


class PlanConfigError(SparvarError):
    """A plan option that is out of range or malformed."""


class LayoutError(SparvarError):
    """A block layout that is malformed or does not fit the tensors it is used with."""


class OutputPathError(SparvarError):
    """An output path that cannot be written as asked: an existing file where a directory goes (or the reverse),
    a directory that is not ours to replace, a read-only or missing parent folder."""
