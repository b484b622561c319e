"""Tables: the one ``mean [lo, hi]`` formatter, text and markdown rendering, and the
rows of every table of ``compare``'s and ``scale``'s reports.

A table is a list of rows of strings, header first::

    >>> render_markdown([["algorithm", "eff. Acc"], ["MEMIT", fmt((0.5, 0.25, 0.75))]])
    '| algorithm | eff. Acc |\\n|---|---|\\n| MEMIT | 0.50 [0.25, 0.75] |'

``found`` below is :func:`~easyedit_replay.experiments.cells.collect_cells`'s dict; a
sequential series is ``found["sequential"][(b, total)]``, ``{"ALG/mode": [step cells]}``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .metrics import Metric, RunKey, metrics, run_order
from .statistics import excludes_zero, paired_difference


def fmt(stat, digits: int = 2, signed: bool = False) -> str:
    """``"mean [lo, hi]"`` of ``(mean, lo, hi)`` with ``digits`` decimals (``+`` signs
    with ``signed``); ``"-"`` when there is no mean."""
    mean, lo, hi = stat
    if mean is None:
        return "-"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def marked(stat) -> str:
    """A paired difference, signed, with ``*`` when its interval excludes 0."""
    return fmt(stat, signed=True) + ("*" if excludes_zero(stat) else "")


def render_text(rows) -> str:
    """Columns padded to their widest cell (terminal)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def render_markdown(rows) -> str:
    """A markdown table of ``rows`` (header first); a ``|`` inside a cell (``|dW| layer 4``)
    is escaped so that the table keeps its columns."""
    def cells(row):
        return " | ".join(c.replace("|", "\\|") for c in row)

    lines = ["| " + cells(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + cells(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def summary_stat(summary: dict, key: str):
    """``(mean, lo, hi)`` of ``key`` in a run's ``summary`` (``(None, None, None)`` when absent)."""
    s = summary.get(key)
    return tuple(s) if s is not None else (None, None, None)


def scale_table_metrics() -> List[Metric]:
    """The columns of ``scale``'s tables: the paper's metrics, then the ``scale`` group's others."""
    paper = metrics("paper")
    return paper + [m for m in metrics("scale") if m not in paper]


# ----------------------------------------------------------------------------- compare


def table_rows(results, group: str = "paper") -> List[List[str]]:
    """Rows of a ``compare`` summary table (header first): the ``group``'s metrics, one row
    per algorithm and mode, 3 decimals."""
    ms = metrics(group)
    header = ["algorithm", "mode"] + [m.label for m in ms] + ["edit time s"]
    rows = [header, ["-", "unedited"] + [fmt(results["unedited"]["summary"][m.key], 3) for m in ms] + ["-"]]
    for key, run in results["runs"].items():
        k = RunKey.parse(key)
        rows.append([k.alg, k.mode] + [fmt(run["summary"][m.key], 3) for m in ms] + [f"{run['seconds']:.1f}"])
    return rows


def analysis_rows(results, name: str = "residual_ratio", digits: int = 3) -> List[List[str]]:
    """Rows of a per-layer analysis table (``residual_ratio`` or ``passive_cosine``):
    one per algorithm and mode, one column per edit layer ("-" where not edited)."""
    layers = sorted({int(l) for run in results["runs"].values() for l in run["diagnostics"][name]})
    rows = [["algorithm", "mode"] + [f"layer {l}" for l in layers]]
    for key, run in results["runs"].items():
        values = run["diagnostics"][name]
        k = RunKey.parse(key)
        rows.append([k.alg, k.mode] + [f"{values[str(l)]:.{digits}f}" if str(l) in values else "-" for l in layers])
    return rows


# ----------------------------------------------------------------------------- pairs


def against_spread(per_edit_by_key: Dict[str, list], spread_by_key: Optional[Dict[str, list]] = None,
                   missing: bool = False):
    """``(alg, mode, rows, reference)`` for every non-spread ``"ALG/mode"`` of
    ``per_edit_by_key`` whose algorithm also has a spread entry, in table order: the
    per-edit rows of the mode and of spread on the same edits, for
    :func:`~easyedit_replay.experiments.statistics.paired_difference`. ``per_edit_by_key``
    maps ``"ALG/mode"`` to the per-edit rows of one batch of ``n`` (or of one sequential
    step, all edits made so far); any other value (a cell) passes through as well.

    ``spread_by_key``: where the spread entries are looked up (default:
    ``per_edit_by_key`` itself; another operating point's entries pair each mode with
    spreading at that point, :mod:`~easyedit_replay.experiments.points`). ``missing``:
    also yield the modes whose algorithm has no spread entry there, with reference None."""
    spreads = per_edit_by_key if spread_by_key is None else spread_by_key
    for key, rows in sorted(per_edit_by_key.items(), key=run_order):
        k = RunKey.parse(key)
        ref = spreads.get(RunKey(k.alg, "spread").text)
        if k.mode != "spread" and (ref is not None or missing):
            yield k.alg, k.mode, rows, ref


def batch_per_edit(found: dict, n: int) -> Dict[str, list]:
    """``{"ALG/mode": per-edit rows}`` of the batch cells of ``n`` edits in ``found``
    (:func:`~easyedit_replay.experiments.cells.collect_cells`); empty when there are none."""
    return {key: cell["run"]["per_edit"] for key, cell in found["batch"].get(n, {}).items()}


def sequential_steps(series: Dict[str, List[dict]]) -> Dict[int, Dict[str, dict]]:
    """``{edits made: {"ALG/mode": step cell}}`` of the evaluated steps of one sequential
    series, in order of edits made; the modes of one algorithm are paired at the steps
    both have evaluated."""
    out: Dict[int, Dict[str, dict]] = {}
    for key, steps in series.items():
        for cell in steps:
            if cell.get("evaluated"):
                out.setdefault(cell["edits"], {})[key] = cell
    return dict(sorted(out.items()))


def sequential_per_edit(series: Dict[str, List[dict]]) -> Dict[int, Dict[str, list]]:
    """``{edits made: {"ALG/mode": per-edit rows of all edits made so far}}``, the per-edit
    rows of :func:`sequential_steps`, for :func:`against_spread`."""
    return {made: {key: cell["per_edit"] for key, cell in cells.items()}
            for made, cells in sequential_steps(series).items()}


# ----------------------------------------------------------------------------- scale


def batch_table(found: dict, n: int, ms: Sequence[Metric] = ()) -> List[List[str]]:
    """Rows (header first) of the size-``n`` table: mean [95% CI] per metric, one row per
    algorithm and mode, and the cell's seconds: the edit (anchors the process had to
    optimize for it included), scoring and fluency (``-`` where a cell has no timing)."""
    ms = list(ms) or scale_table_metrics()
    header = ["algorithm", "mode"] + [m.label for m in ms] + ["edit s", "scoring s", "fluency s"]
    rows = [header]
    un = found["unedited"].get(n)
    if un:
        rows.append(["-", "unedited"] + [fmt(tuple(un["summary"][m.key])) if m.key in un["summary"] else "-"
                                         for m in ms] + ["-", "-", "-"])
    for key, cell in sorted(found["batch"].get(n, {}).items(), key=run_order):
        run = cell["run"]
        timing = run.get("timing") or {}
        k = RunKey.parse(key)
        rows.append([k.alg, k.mode] + [fmt(summary_stat(run["summary"], m.key)) for m in ms]
                    + [f"{run['seconds']:.0f}"]
                    + [f"{timing[t]:.0f}" if t in timing else "-" for t in ("eval_seconds", "fluency_seconds")])
    return rows


def paired_table(found: dict, n: int, n_boot: int, seed: int, ms: Sequence[Metric] = ()) -> List[List[str]]:
    """Rows (header first): ``mode - spread`` on the same edits, mean [95% paired
    bootstrap interval], one row per algorithm and non-spread mode; a ``*`` marks an
    interval that excludes 0."""
    ms = list(ms) or scale_table_metrics()
    rows = [["algorithm", "mode - spread"] + [m.label for m in ms]]
    for alg, mode, per_edit, ref in against_spread(batch_per_edit(found, n)):
        rows.append([alg, mode] + [marked(paired_difference(per_edit, ref, m.key, n_boot, seed)) for m in ms])
    return rows


def sequential_paired_table(series: Dict[str, List[dict]], n_boot: int, seed: int,
                            ms: Sequence[Metric] = ()) -> List[List[str]]:
    """Rows (header first) of one sequential series: ``mode - spread`` on all edits made
    so far, at every step both have evaluated, mean [95% paired bootstrap interval]
    (``*``: excludes 0)."""
    ms = list(ms) or scale_table_metrics()
    rows = [["algorithm", "mode - spread", "edits made"] + [m.label for m in ms]]
    by_step = sequential_per_edit(series)
    for alg, mode in dict.fromkeys((a, m) for made in by_step.values() for a, m, _, _ in against_spread(made)):
        key, spread = RunKey(alg, mode).text, RunKey(alg, "spread").text
        for made, per_edit_by_key in by_step.items():
            if key in per_edit_by_key and spread in per_edit_by_key:
                per_edit, ref = per_edit_by_key[key], per_edit_by_key[spread]
                rows.append([alg, mode, str(made)]
                            + [marked(paired_difference(per_edit, ref, m.key, n_boot, seed)) for m in ms])
    return rows


def clear_differences(found: dict, n_boot: int, seed: int) -> List[str]:
    """Plain-words lines: every paired difference ``mode - spread`` (the ``scale``
    metrics) whose 95% interval excludes 0, per size of one batch and per evaluated step
    of each sequential series, with its direction (better / worse)."""
    groups = [(f"n = {n}", batch_per_edit(found, n)) for n in sorted(found["batch"])]
    for (b, total), series in sorted(found["sequential"].items()):
        groups += [(f"sequential in batches of {b}, {made} edits made", per_edit_by_key)
                   for made, per_edit_by_key in sequential_per_edit(series).items()]
    lines = []
    for where, per_edit_by_key in groups:
        for alg, mode, per_edit, ref in against_spread(per_edit_by_key):
            for m in metrics("scale"):
                stat = paired_difference(per_edit, ref, m.key, n_boot, seed)
                if not excludes_zero(stat):
                    continue
                mean, lo, hi = stat
                better = (mean > 0) == m.higher_is_better
                lines.append(f"- {where}, {alg}: {mode} - spread, {m.label} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                             f"({'better' if better else 'worse'})")
    return lines


def sequential_table(steps_by_key: Dict[str, List[dict]], ms: Sequence[Metric] = ()) -> List[List[str]]:
    """Rows (header first) of one sequential series: each evaluated step's metrics of all
    edits made so far, mean [95% CI], and the step's edit seconds."""
    ms = list(ms) or scale_table_metrics()
    rows = [["algorithm", "mode", "edits made"] + [m.label for m in ms] + ["edit s (step)"]]
    for key, steps in sorted(steps_by_key.items(), key=run_order):
        k = RunKey.parse(key)
        for cell in steps:
            if not cell.get("evaluated"):
                continue
            rows.append([k.alg, k.mode, str(cell["edits"])] + [fmt(summary_stat(cell["summary"], m.key)) for m in ms]
                        + [f"{cell['seconds']:.0f}"])
    return rows


def retention_table(steps_by_key: Dict[str, List[dict]], key: str = "efficacy_exact") -> List[List[str]]:
    """Rows (header first) of one sequential series: after each evaluated step, the mean
    of ``key`` (per-edit, default exact-match efficacy) over the edits of each batch made
    so far, so that forgetting shows: batch 1's edits after step 1, 2, ... A cell of a
    batch not yet made is empty."""
    evaluated = {k: [c for c in steps if c.get("evaluated")] for k, steps in steps_by_key.items()}
    n_batches = max((c["step"] for steps in evaluated.values() for c in steps), default=0)
    rows = [["algorithm", "mode", "edits made"] + [f"batch {j + 1}" for j in range(n_batches)]]
    for k, steps in sorted(evaluated.items(), key=run_order):
        run = RunKey.parse(k)
        for cell in steps:
            b = cell["batch_size"]
            means = []
            for j in range(n_batches):
                values = [r[key] for r in cell["per_edit"][j * b:(j + 1) * b] if r.get(key) is not None]
                means.append(f"{sum(values) / len(values):.2f}" if values and j < cell["step"] else "")
            rows.append([run.alg, run.mode, str(cell["edits"])] + means)
    return rows


def retention_paired_table(series: Dict[str, List[dict]], n_boot: int, seed: int,
                           key: str = "efficacy_exact") -> List[List[str]]:
    """Rows (header first) of one sequential series: ``mode - spread`` on the edits of each
    batch made so far (per-edit ``key``, default exact-match efficacy), at every step both
    have evaluated, mean [95% paired bootstrap interval] (``*``: excludes 0): whether a
    construction keeps an earlier batch better than spreading on the same edits, which
    the unpaired :func:`retention_table` cannot say. A cell of a batch not yet made is
    empty."""
    by_step = sequential_per_edit(series)
    size = next((c["batch_size"] for steps in series.values() for c in steps), 1)
    n_batches = max(by_step, default=0) // size
    rows = [["algorithm", "mode - spread", "edits made"] + [f"batch {j + 1}" for j in range(n_batches)]]
    for made, per_edit_by_key in by_step.items():
        for alg, mode, per_edit, ref in against_spread(per_edit_by_key):
            rows.append([alg, mode, str(made)] + [
                marked(paired_difference(per_edit[j * size:(j + 1) * size], ref[j * size:(j + 1) * size], key,
                                         n_boot, seed)) if j < made // size else ""
                for j in range(n_batches)])
    rows[1:] = sorted(rows[1:], key=lambda r: (run_order(RunKey(r[0], r[1])), int(r[2])))
    return rows


def layer_index(name: str) -> Optional[int]:
    """``"model.layers.4.mlp.down_proj.weight"`` -> ``4``: the first dotted part of a
    module or weight name that is a number; None when there is none."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def layer_of(name: str) -> str:
    """``"model.layers.4.mlp.down_proj.weight"`` -> ``"layer 4"`` (the name itself without a layer index)."""
    index = layer_index(name)
    return f"layer {index}" if index is not None else name


def _per_weight_table(steps_by_key: Dict[str, List[dict]], values, header, form: str) -> List[List[str]]:
    """Rows (header first) of one sequential series, one per step: ``values(cell)`` (``{module
    or weight name: number}``) in one column per name, headed ``header(name)`` (``"-"``
    where a step has no value)."""
    names = list(dict.fromkeys(n for steps in steps_by_key.values() for c in steps for n in values(c)))
    rows = [["algorithm", "mode", "step"] + [header(n) for n in names]]
    for k, steps in sorted(steps_by_key.items(), key=run_order):
        run = RunKey.parse(k)
        for cell in steps:
            found = values(cell)
            rows.append([run.alg, run.mode, str(cell["step"])]
                        + [form.format(found[n]) if n in found else "-" for n in names])
    return rows


def update_norm_table(steps_by_key: Dict[str, List[dict]]) -> List[List[str]]:
    """Rows (header first) of one sequential series: the Frobenius norm of each step's
    weight update per edited weight (``analysis["update_norm"]``; a column is named by
    the weight's layer index), one row per step."""
    return _per_weight_table(steps_by_key, lambda c: (c.get("analysis") or {}).get("update_norm", {}),
                             lambda n: f"|dW| {layer_of(n)}", "{:.1f}")


def key_drift_table(steps_by_key: Dict[str, List[dict]], batch: int = 1) -> List[List[str]]:
    """Rows (header first): after each step, how far the keys of batch ``batch``'s edits
    have moved since their edit, mean ``|k_now - k_edit| / |k_edit|`` per edited weight
    (``cell["sequential"]["key_drift"]``)."""
    def values(cell):
        drift = (cell.get("sequential") or {}).get("key_drift", {}).get(str(batch), {})
        return {name: stats["relative_change"] for name, stats in drift.items()}

    return _per_weight_table(steps_by_key, values, lambda n: f"key drift {layer_of(n)}", "{:.4f}")


def norm_values(norms: dict) -> Dict[tuple, float]:
    """``{("delta", module): |delta|, ("target", module): |t|}`` of one batch's anchor and
    target norms (``analysis["norms"]``: ``{"anchor": {module: {"delta": ...}}, "targets":
    {module: {"norm": ...}}}``, means over the batch relative to the unedited model's mean
    norm of the module); empty for a batch that has none."""
    out = {("delta", m): v["delta"] for m, v in (norms or {}).get("anchor", {}).items()}
    out.update({("target", m): v["norm"] for m, v in (norms or {}).get("targets", {}).items()})
    return out


def norm_label(name: tuple) -> str:
    """The column of a :func:`norm_values` key: ``("delta", "model.layers.4")`` -> ``"|delta| layer 4"``."""
    return f"{'|delta|' if name[0] == 'delta' else '|t|'} {layer_of(name[1])}"


def norm_order(name: tuple) -> tuple:
    """Sort key of a :func:`norm_values` key: the anchor ``|delta|`` columns first, then
    the targets ``|t|``, each by layer number (layer 10 after layer 9), names without a
    layer index last."""
    index = layer_index(name[1])
    return name[0] != "delta", index is None, index or 0, name[1]


def target_norm_table(steps_by_key: Dict[str, List[dict]]) -> List[List[str]]:
    """Rows (header first): each step's anchor ``|delta|`` and the norm of its target at
    every edited layer, means over the batch relative to the unedited model's mean norm
    of that module (``cell["sequential"]["norms"]``, :func:`norm_values`)."""
    return _per_weight_table(steps_by_key, lambda cell: norm_values((cell.get("sequential") or {}).get("norms")),
                             norm_label, "{:.2f}")


def attribution_table(steps_by_key: Dict[str, List[dict]], key: str = "efficacy_exact") -> List[List[str]]:
    """Rows (header first) of the restore-one-layer attribution (``--attribution``): for
    each attributed step and earlier batch, ``key`` of that batch's edits now, with every
    edited weight set back to its value right after the batch, and with each one alone
    set back."""
    names = list(dict.fromkeys(n for steps in steps_by_key.values() for c in steps
                               for entry in (c.get("sequential") or {}).get("attribution", {}).values()
                               for n in entry["restored"]))
    rows = [["algorithm", "mode", "step", "batch", "now", "all set back"] + [f"{layer_of(n)} set back" for n in names]]
    for k, steps in sorted(steps_by_key.items(), key=run_order):
        run = RunKey.parse(k)
        for cell in steps:
            for j, entry in (cell.get("sequential") or {}).get("attribution", {}).items():
                restored = entry["restored"]
                rows.append([run.alg, run.mode, str(cell["step"]), j, f"{entry['now'][key]:.2f}",
                             f"{entry['after_batch'][key]:.2f}"]
                            + [f"{restored[n][key]:.2f}" if n in restored else "-" for n in names])
    return rows
