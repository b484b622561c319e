"""Bootstrap statistics of per-edit rows: means with percentile intervals, paired
differences on the same edits, per-layer means of the section-4 analyses.

    >>> bootstrap([1.0, 0.0, 1.0, 1.0], n_boot=200)[0]
    0.75
"""

from __future__ import annotations

import math
import random
from typing import Dict, List, Optional, Sequence

from .metrics import metrics


def bootstrap(values: Sequence[Optional[float]], n_boot: int = 1000, seed: int = 0):
    """``(mean, lo, hi)``: the mean of ``values`` (None, NaN and infinite values dropped:
    a per-edit value that is not defined for that edit, such as the residual ratio of an
    edit whose anchor needed no change) and its 95% percentile bootstrap interval over
    ``n_boot`` resamples; ``(None, None, None)`` if empty."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None, None
    rng = random.Random(seed)
    n = len(vals)
    means = sorted(sum(rng.choices(vals, k=n)) / n for _ in range(n_boot))
    lo, hi = means[int(0.025 * (n_boot - 1))], means[int(math.ceil(0.975 * (n_boot - 1)))]
    return sum(vals) / n, lo, hi


def paired_difference(rows: Sequence[dict], reference: Sequence[dict], key: str, n_boot: int = 1000, seed: int = 0):
    """``(mean, lo, hi)`` of ``rows[i][key] - reference[i][key]`` over the edits where
    both are present: the paired difference on the same edits, with its 95% percentile
    bootstrap interval (edits resampled with both values together)."""
    diffs = [a.get(key) - r.get(key) for a, r in zip(rows, reference)
             if a.get(key) is not None and r.get(key) is not None
             and math.isfinite(a.get(key)) and math.isfinite(r.get(key))]
    return bootstrap(diffs, n_boot, seed)


def summarized_metrics() -> List[str]:
    """The keys :func:`summarize_ci` bootstraps, in the order of a run's ``summary``:
    the ``paper`` metrics, then the ``easyedit`` ones, then any other registered one."""
    first = [m.key for g in ("paper", "easyedit") for m in metrics(g)]
    return first + [m.key for m in metrics() if m.key not in first]


def summarize_ci(rows: Sequence[dict], n_boot: int, seed: int) -> Dict[str, tuple]:
    """``{metric: (mean, lo, hi)}`` of every :func:`summarized_metrics` key over ``rows``."""
    return {k: bootstrap([r.get(k) for r in rows], n_boot, seed) for k in summarized_metrics()}


def mean(values) -> Optional[float]:
    """The mean of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize_analyses(analyses: Sequence[dict]) -> Dict[str, Dict[str, float]]:
    """``{"residual_ratio": {layer: mean}, "passive_cosine": {layer: mean}}`` over every
    request of every batch (the paper's Tables 2/5 and 1)."""
    out: Dict[str, Dict[str, float]] = {}
    for name in ("residual_ratio", "passive_cosine"):
        per_layer: Dict[str, List[float]] = {}
        for a in analyses:
            for layer, values in a[name].items():
                per_layer.setdefault(layer, []).extend(values)
        out[name] = {layer: sum(v) / len(v) for layer, v in per_layer.items()}
    return out


def finite(stat) -> bool:
    """Whether ``(mean, lo, hi)`` has a mean and all three are finite."""
    return stat[0] is not None and all(math.isfinite(v) for v in stat)


def excludes_zero(stat) -> bool:
    """Whether the interval of ``(mean, lo, hi)`` excludes 0 (a clear difference)."""
    return stat[0] is not None and (stat[1] > 0 or stat[2] < 0)
