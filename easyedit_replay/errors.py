"""Exception types of the plugin.

Every error the plugin raises on bad input is a :class:`ReplayError`; its message
names the field, the value it got and how to fix it. Edits that raise leave the
model's weights bit-identical to before (see :mod:`easyedit_replay.editor`).
"""

from __future__ import annotations


class ReplayError(Exception):
    """Base class of every error raised by easyedit-replay."""


class HyperParamsError(ReplayError, ValueError):
    """A hyperparameter (YAML field or dataclass attribute) is missing or invalid."""


class RequestError(ReplayError, ValueError):
    """An edit request (EasyEdit request dict) is malformed."""


class NumericalError(ReplayError, ArithmeticError):
    """A non-finite anchor, key, residual or solve was detected before any write."""


class StatisticsError(ReplayError, RuntimeError):
    """Covariance statistics could not be computed, or a cache file is unusable."""


class ModelLoadError(ReplayError, RuntimeError):
    """The requested model could not be found or loaded."""


def field_error(cls, field: str, value, fix: str, where: str = "hparams"):
    """Build ``cls`` with the house message format: field, value, fix."""
    shown = repr(value)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return cls(f"{where}.{field} = {shown}: {fix}")


def check_finite(t, what: str) -> None:
    """Raise :class:`NumericalError` when the tensor ``t`` holds a NaN or an infinity
    (``what`` names it), before any weight is written.

    Raises:
        NumericalError: naming ``what`` and the usual causes."""
    if not t.isfinite().all():
        raise NumericalError(f"non-finite {what}; no weight was changed. Check the request, the statistics and v_lr")
