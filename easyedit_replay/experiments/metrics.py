"""The metric registry and the order of algorithms and constructions in every table and plot.

A metric is one :class:`Metric` line in :data:`METRICS`; its ``groups`` say where it
appears, and every table, plot and summary reads its columns from here::

    >>> [m.key for m in metrics("paired")]
    ['efficacy_exact', 'generalization_exact', 'locality_dkl']

Groups:

- ``records``: computed by :func:`easyedit_replay.evaluate.evaluate_records` (teacher-forced),
  averaged by :func:`easyedit_replay.evaluate.summarize`;
- ``paper``: ``compare``'s first table, and with ``scale`` the first columns of every
  ``scale`` table;
- ``easyedit``: ``compare``'s second table;
- ``scale``: ``scale``'s plots, its clear-differences list and its extra table columns
  (with ``paper``), the condensed ``report --markdown --scale`` columns;
- ``paired``: the paired columns of ``report --markdown --scale`` and ``tune``'s
  paired table;
- ``curve``: the per-batch means of a sequential ``compare`` run;
- ``summary``: the condensed ``report --markdown --compare`` table (``paper`` members
  first, then ``easyedit`` ones);
- ``allocation``: the allocation report's table.

The runs of an experiment are keyed by :class:`RunKey` (algorithm, mode spec); on disk
and in ``results.json`` the key is written ``"ALG/mode"`` (:meth:`RunKey.text`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Mapping, Tuple


@dataclass(frozen=True)
class Metric:
    """One reported per-edit quantity.

    Attributes:
        key: the per-edit row's key (``evaluate.evaluate_records``, ``runner.score_rows``
            or the edit's diagnostics).
        label: the column header.
        higher_is_better: direction of "better" (plots, clear differences).
        groups: the tables and plots it appears in (module docstring).
        labels: the header in a group where it differs from ``label``.
    """

    key: str
    label: str
    higher_is_better: bool = True
    groups: Tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def label_in(self, group: str) -> str:
        """The column header in ``group``: ``labels[group]`` where set, else :attr:`label`."""
        return self.labels.get(group, self.label)


# The registry, in column order (a group lists its members in this order).
METRICS: Tuple[Metric, ...] = (
    Metric("efficacy_win", "eff. Success", True, ("records", "paper", "curve", "summary")),
    Metric("efficacy_exact", "eff. Acc", True, ("records", "paper", "scale", "paired", "summary", "allocation")),
    Metric("generalization_win", "gen. Success", True, ("records", "paper", "curve", "summary")),
    Metric("generalization_exact", "gen. Acc", True, ("records", "paper", "scale", "paired", "summary",
                                                            "allocation")),
    Metric("efficacy_acc", "efficacy", True, ("records", "easyedit", "curve", "summary"), {"summary": "token eff."}),
    Metric("generalization_acc", "generalization", True, ("records", "easyedit", "curve")),
    Metric("specificity", "specificity", True, ("records", "easyedit", "curve", "summary"), {"summary": "locality"}),
    Metric("locality_dkl", "DKL", False, ("records", "paper", "scale", "paired", "curve", "summary", "allocation")),
    Metric("locality_top1", "Top-1", True, ("records", "paper", "scale", "summary", "allocation")),
    Metric("locality_top5", "Top-5", True, ("records", "paper")),
    Metric("locality_top10", "Top-10", True, ("records", "paper", "summary")),
    Metric("fluency", "fluency", True, ("easyedit", "scale", "summary")),
    Metric("target_error", "target error", False, ("easyedit",)),
    Metric("final_ratio", "final resid. ratio", False, ("easyedit", "scale")),
)


def register_metric(m: Metric) -> Metric:
    """Add ``m`` at the end of the registry (a plugin's metric; a built-in one is a line of
    :data:`METRICS`). Every table and plot of its groups then shows it, and
    ``summarize_ci`` bootstraps it from the per-edit rows' ``m.key``.

    Raises:
        ValueError: a key that is already registered.
    """
    global METRICS
    if any(old.key == m.key for old in METRICS):
        raise ValueError(f"metric {m.key!r} is already registered")
    METRICS = METRICS + (m,)
    return m


def metrics(*groups: str) -> List[Metric]:
    """The metrics in any of ``groups``, in registry order (all of them without ``groups``)."""
    return [m for m in METRICS if not groups or any(g in m.groups for g in groups)]


def metric(key: str) -> Metric:
    """The registered metric ``key``.

    Raises:
        KeyError: no metric has that key.
    """
    for m in METRICS:
        if m.key == key:
            return m
    raise KeyError(f"no metric {key!r}; registered: {[m.key for m in METRICS]}")


def summary_metrics() -> List[Metric]:
    """The condensed compare table's columns: the ``summary`` members of ``paper``, then of ``easyedit``."""
    return [m for g in ("paper", "easyedit") for m in metrics(g) if "summary" in m.groups]


# ----------------------------------------------------------------------------- runs and their order


@dataclass(frozen=True, order=True)
class RunKey:
    """One run of an experiment: a base algorithm and a mode spec (``"replay"``,
    ``"replay_tau=0.25"``, ``"replay+rekeyed"``)."""

    alg: str
    mode: str

    @property
    def text(self) -> str:
        """``"ALG/mode"``: the key in ``results.json`` and in cell file collections."""
        return f"{self.alg}/{self.mode}"

    @classmethod
    def parse(cls, text: str) -> "RunKey":
        """``"ALG/mode"`` -> ``RunKey("ALG", "mode")``."""
        alg, mode = text.split("/", 1)
        return cls(alg, mode)


ALGORITHM_ORDER = ("MEMIT", "PMET", "EMMET", "AlphaEdit")  # the built-in rules, as registered
MODE_ORDER = ("spread", "replay", "replay_remaining", "blue", "onelayer", "nodiv")  # the paper's constructions


def run_order(item) -> tuple:
    """Sort key of a run (a :class:`RunKey`, an ``"ALG/mode"`` string, or a ``(key,
    value)`` item of either): the built-in algorithms in registry order, then the paper's
    constructions in the paper's order, others after them by name."""
    key = item[0] if isinstance(item, tuple) else item
    run = key if isinstance(key, RunKey) else RunKey.parse(key)
    alg, mode = run.alg, run.mode
    return (ALGORITHM_ORDER.index(alg) if alg in ALGORITHM_ORDER else len(ALGORITHM_ORDER), alg,
            MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode)


# Plot styles: (marker, line style) per construction; replay-family lines solid, spreading dashed.
_MARKERS = {"spread": ("o", "--"), "replay": ("s", "-"), "replay_remaining": ("v", "-"), "blue": ("^", ":"),
            "onelayer": ("D", ":"), "nodiv": ("x", ":")}


def mode_style(mode: str) -> Tuple[str, str]:
    """``(marker, linestyle)`` of a mode spec in ``scale``'s plots: the paper's
    constructions their own, every other (``replay_tau``, ``replay_capacity``,
    ``replay_joint``, a registered one) a dot with the replay family's solid line."""
    return _MARKERS.get(mode, (".", "-"))


if len({m.key for m in METRICS}) != len(METRICS):  # pragma: no cover - a registry edit
    raise ValueError("metric keys must be unique")
