"""Reports: ``compare``'s report (text and ``report.md``), ``scale``'s ``report.md``, and
``easyedit-replay report --markdown``, the condensed tables of ``docs/results.md``.

    easyedit-replay report --markdown docs/results/cf48_all/results.json     # a compare run
    easyedit-replay report --markdown docs/results/scale_cf --modes spread,replay   # scale cells
    easyedit-replay report --markdown --allocation docs/results/scale_cf/n00192/results.json --out DIR

The condensed ``compare`` table has the ``summary`` metrics, mean [95% bootstrap
interval], one row per algorithm and mode, then the residual ratio after each edited
layer (the paper's Tables 2 and 5) and the passive cosine (Table 1). The condensed
``scale`` table has one row per kind (one batch at every n; each sequential series by
edits made): the ``scale`` metrics with their intervals and, next to each ``paired``
metric, ``mode - spread`` on the same edits with its paired interval (``*``: the
interval excludes 0); planned cells that are not finished are listed. The allocation
tables compare every rule of one ``compare`` run with ``replay`` on the same edits.
``report --points`` (``scale`` folders side by side across operating points) is
:mod:`~easyedit_replay.experiments.points`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..files import atomic_write_text
from .cells import check_modes, collect_cells, describe, missing_cells, plan_points, results_for_n
from .metrics import RunKey, metrics, run_order, summary_metrics
from .plots import (
    plot_allocation, plot_paired, plot_residual_ratio, plot_scale, plot_sequential, plot_sequential_paired,
    plot_sequential_scale, plot_target_error,
)
from .statistics import paired_difference
from .tables import (
    analysis_rows, attribution_table, batch_table, clear_differences, fmt, key_drift_table, marked, paired_table,
    render_markdown, render_text, retention_paired_table, retention_table, sequential_paired_table, sequential_steps,
    sequential_table, table_rows, target_norm_table, update_norm_table, against_spread,
)

# ----------------------------------------------------------------------------- compare


# What the rows of a comparison are: the terminal (:func:`render_report`) and report.md (:func:`write_outputs`)
# say it under their tables.
ROWS_NOTE = ("mode: the target construction (spread: stock backward spreading, anchor at l_n; replay: forward "
             "replay, the paper's FE, anchor at l_1; the others: docs/method.md). edit time s: seconds to compute and "
             "apply the edit, including covariance statistics and anchors computed on first use; anchors found in the "
             "anchor cache (e.g. EMMET's after MEMIT's) make it shorter, so it is no speed comparison "
             "(docs/performance.md).")


def render_report(results) -> str:
    """The four tables of a comparison as plain text (terminal), then :data:`ROWS_NOTE`."""
    return "\n\n".join([
        "the paper's metrics (Success: P(new) > P(true); Acc: exact match under greedy decoding; "
        "DKL / Top-k: next-token distribution on neighbourhood prompts vs the unedited model)",
        render_text(table_rows(results, "paper")),
        "EasyEdit's metrics and diagnostics (token accuracy, locality, n-gram entropy, target error, "
        "final-layer residual ratio)",
        render_text(table_rows(results, "easyedit")),
        "residual ratio |m_L - h_L(after layer)| / |m_L - h_L(unedited)| (the paper's Tables 2 and 5; lower is better)",
        render_text(analysis_rows(results, "residual_ratio")),
        "cosine of each layer's own output change with the change it causes at l_n (the paper's Table 1)",
        render_text(analysis_rows(results, "passive_cosine")),
        ROWS_NOTE,
    ])


def write_outputs(results, out_dir, title: str) -> Dict[str, Path]:
    """``report.md``, ``results.json`` and PNG plots in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.json"}
    files["results"].write_text(json.dumps(results, indent=1, default=str))
    plots = {"residual_ratio": plot_residual_ratio(results, out / "residual_ratio.png"),
             "target_error": plot_target_error(results, out / "target_error.png"),
             "sequential": plot_sequential(results, out / "sequential.png")}
    lines = [f"# {title}", "", "## The paper's metrics", "", render_markdown(table_rows(results, "paper")), "",
             "Success: P(new) > P(true), teacher-forced; Acc: exact match of the target under greedy decoding; "
             "DKL: KL(unedited || edited) of the next-token distribution at the end of the neighbourhood prompt "
             "(lower is better); Top-k: overlap of the top-k next tokens with the unedited model's.", "",
             "## EasyEdit's metrics and diagnostics", "", render_markdown(table_rows(results, "easyedit")), "",
             "efficacy / generalization: teacher-forced token accuracy; specificity: unchanged locality "
             "predictions; fluency: n-gram entropy of greedy continuations; target error: mean over edited "
             "layers of |h - target| / |target| after the edit; final resid. ratio: the ratio below at the "
             "last edited layer.", "",
             "## Residual ratio after each edited layer (the paper's Tables 2 and 5)", "",
             render_markdown(analysis_rows(results, "residual_ratio")), "",
             "|m_L - h_L(after layer)| / |m_L - h_L(unedited)| at the last edit layer l_n; m_L is the "
             "construction's final target (spread/nodiv/onelayer/blue: the anchor at l_n; replay: the replayed "
             "z^{l_n}). Mean over edits.", "",
             "## Passive cosine (the paper's Table 1)", "", render_markdown(analysis_rows(results, "passive_cosine")),
             "", "Cosine between a layer's own output change and the change it causes at l_n. Mean over edits.", "",
             "Cells of the first two tables: mean over edits [95% bootstrap interval].", "", ROWS_NOTE, ""]
    for name, p in plots.items():
        if p:
            files[name] = p
            lines += [f"![{name}]({p.name})", ""]
    files["report"] = out / "report.md"
    files["report"].write_text("\n".join(lines))
    return files


# ----------------------------------------------------------------------------- scale


def write_scale_report(out_dir, n_boot: int = 1000, seed: int = 0) -> Path:
    """``report.md``, the PNG plots and ``n<N>/results.json`` from every finished cell of
    ``out_dir``; missing planned cells are listed. Returns the report's path."""
    out = Path(out_dir)
    meta = json.loads((out / "scale.json").read_text()).get("meta", {}) if (out / "scale.json").exists() else {}
    found = collect_cells(out)
    for n in found["batch"]:
        atomic_write_text(out / f"n{n:05d}" / "results.json",
                          json.dumps(results_for_n(found, n, meta), indent=1, default=str))
    plots = {"scale": plot_scale(found, out / "scale_metrics.png"),
             "paired": plot_paired(found, out / "scale_paired.png", n_boot, seed),
             "sequential": plot_sequential_scale(found, out / "scale_sequential.png"),
             "sequential_paired": plot_sequential_paired(found, out / "scale_sequential_paired.png", n_boot, seed)}
    title = f"{meta.get('model', 'model')}: edits from {meta.get('data', '?')} at growing n"
    lines = [f"# {title}", "",
             "Cells: mean over edits [95% percentile bootstrap interval, 1000 resamples]. Paired tables: "
             "`mode - spread` on the same edits, mean [95% paired bootstrap interval]; `*` marks an interval "
             "that excludes 0. Success: P(new) > P(true); Acc: exact match under greedy decoding; DKL: "
             "KL(unedited || edited) of the next token at the neighbourhood prompt (lower is better); Top-k: "
             "overlap of the top-k next tokens; fluency: n-gram entropy of greedy continuations; final resid. "
             "ratio: |m_L - h_L| / |m_L - h_L(unedited)| at l_n after the edit (lower is better).", ""]
    points = plan_points(meta)
    if points:
        lines += [f"Operating point: {', '.join(points)} (`scale --point`; its anchor settings are in "
                  f"hparams/README.md, \"Operating points\").", ""]
    for n in sorted(found["batch"]):
        lines += [f"## One batch of {n} edits", "", render_markdown(batch_table(found, n)), "",
                  f"Paired differences, {n} edits:", "", render_markdown(paired_table(found, n, n_boot, seed)), ""]
    clear = clear_differences(found, n_boot, seed)
    if found["batch"]:
        lines += ["## Paired differences whose 95% interval excludes 0", ""] + (clear or ["- none"]) + [""]
    for (b, total), series in sorted(found["sequential"].items()):
        lines += _series_lines(series, b, total, n_boot, seed)
    missing = missing_cells(out, found)
    if missing:
        lines += ["## Missing cells (planned, not finished yet)", ""]
        lines += [f"- {describe(c)}" for c in missing] + [""]
    for name, p in plots.items():
        if p:
            lines += [f"![{name}]({p.name})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _series_lines(series: Dict[str, List[dict]], b: int, total: int, n_boot: int, seed: int) -> List[str]:
    """The report section of one sequential series."""
    lines = [f"## Sequential: {total} edits in batches of {b}", "",
             render_markdown(sequential_table(series)), "",
             f"Paired differences, sequential in batches of {b} (all edits made so far):", "",
             render_markdown(sequential_paired_table(series, n_boot, seed)), "",
             "Retention: efficacy Acc of each batch's edits after every step (forgetting of the earlier "
             "batches):", "", render_markdown(retention_table(series)), "",
             "Retention, paired: mode - spread on each batch's edits (efficacy Acc):", "",
             render_markdown(retention_paired_table(series, n_boot, seed)), "",
             "Each step's weight update, Frobenius norm per edited weight:", "",
             render_markdown(update_norm_table(series)), ""]
    if any(c.get("sequential") for steps in series.values() for c in steps):
        lines += ["Each step's anchor |delta| and targets |t|, relative to the unedited model's mean norm of the "
                  "module (mean over the batch):", "", render_markdown(target_norm_table(series)), "",
                  "Key drift of the first batch's edits after each step, |k_now - k_edit| / |k_edit| (mean):", "",
                  render_markdown(key_drift_table(series)), ""]
    if any((c.get("sequential") or {}).get("attribution") for steps in series.values() for c in steps):
        lines += ["Where earlier batches' efficacy Acc went: now, with every edited weight set back to its value "
                  "right after the batch, and with one weight set back:", "",
                  render_markdown(attribution_table(series)), ""]
    ranks = [(key, c["step"], c["alphaedit_cache_rank"]) for key, steps in sorted(series.items(), key=run_order)
             for c in steps if c.get("alphaedit_cache_rank")]
    if ranks:
        lines += ["AlphaEdit's key cache after each step (rank of sum K K^T per weight, min..max): "
                  + "; ".join(f"{k} step {s}: {min(r.values())}..{max(r.values())}" for k, s, r in ranks), ""]
    return lines


# ----------------------------------------------------------------------------- report --markdown


def compare_markdown(results: dict) -> str:
    """The condensed tables of a ``compare`` results dict (module docstring), 2 decimals."""
    parts = [f"{results['n']} edits from {results.get('data')}, one batch", ""]
    ms = summary_metrics()
    rows = [["algorithm", "mode"] + [m.label_in("summary") for m in ms],
            ["-", "unedited"] + [fmt(results["unedited"]["summary"][m.key]) for m in ms]]
    for key, run in results["runs"].items():
        k = RunKey.parse(key)
        rows.append([k.alg, k.mode] + [fmt(run["summary"][m.key]) for m in ms])
    parts.append(render_markdown(rows))
    for name, title in (("residual_ratio", "residual ratio after each edited layer"),
                        ("passive_cosine", "passive cosine")):
        parts += ["", title, "", render_markdown(analysis_rows(results, name, digits=2))]
    return "\n".join(parts) + "\n"


def _scale_rows(first: str, cells: dict, modes) -> list:
    """``(key, markdown row)``, one per ``"ALG/mode"`` of ``cells`` (``{key: (summary,
    per-edit rows)}``, one batch of n or one sequential step): each ``scale`` metric with
    its interval and, after each ``paired`` one, ``mode - spread`` on the same edits."""
    reference = {RunKey(alg, mode).text: ref for alg, mode, _, ref in
                 against_spread({key: per_edit for key, (_, per_edit) in cells.items()})}
    rows = []
    for key, (summary, per_edit) in sorted(cells.items(), key=run_order):
        k = RunKey.parse(key)
        if modes and k.mode not in modes:
            continue
        row = [first, k.alg, k.mode]
        for m in metrics("scale"):
            row.append(fmt(tuple(summary[m.key])))
            if "paired" in m.groups:
                row.append(marked(paired_difference(per_edit, reference[key], m.key)) if key in reference else "-")
        rows.append((key, "| " + " | ".join(row) + " |"))
    return rows


def scale_markdown(out_dir, modes: Optional[Sequence[str]] = None) -> str:
    """The condensed tables of ``scale --out DIR`` cells (only the ``modes`` listed, all
    when None): one batch at every n, then each sequential series by edits made (rows
    grouped by algorithm and mode), both with the paired columns, and the missing cells.

    Raises:
        ReplayError: an entry of ``modes`` that no cell has
            (:func:`~easyedit_replay.experiments.cells.check_modes`).
    """
    found = collect_cells(out_dir)
    check_modes(modes, [found], f"report {out_dir}")
    chunks = []

    def header(first):
        head = [first, "algorithm", "mode"]
        for m in metrics("scale"):
            head += [m.label] + ([f"{m.label} - spread"] if "paired" in m.groups else [])
        return "| " + " | ".join(head) + " |\n|" + "---|" * len(head)

    if found["batch"]:
        chunks.append(header("n"))
    for n in sorted(found["batch"]):
        cells = {key: (c["run"]["summary"], c["run"]["per_edit"]) for key, c in found["batch"][n].items()}
        chunks.append("\n".join(row for _, row in _scale_rows(str(n), cells, modes)))
    for (b, total), series in sorted(found["sequential"].items()):
        chunks.append(f"\nsequential: {total} edits in batches of {b}\n\n" + header("edits made"))
        rows = [(run_order(key), made, row) for made, cells in sequential_steps(series).items()
                for key, row in _scale_rows(str(made), {k: (c["summary"], c["per_edit"]) for k, c in cells.items()},
                                            modes)]
        chunks.append("\n".join(row for *_, row in sorted(rows)))
    missing = missing_cells(out_dir)
    if missing:
        chunks.append("\nmissing (planned, not finished):\n")
        chunks += [f"- {describe(cell)}" for cell in missing]
    return "".join(c + "\n" for c in chunks)


ALLOCATION_REFERENCE = "replay"


def _by_algorithm(results: Dict) -> Dict[str, Dict[str, Dict]]:
    out: Dict[str, Dict[str, Dict]] = {}
    for key, run in results["runs"].items():
        k = RunKey.parse(key)
        out.setdefault(k.alg, {})[k.mode] = run
    return out


def update_norms(run) -> Dict[int, float]:
    """``{layer: mean ||dW||_F}`` over batches (summed over a layer's sites, PMET)."""
    per: Dict[int, List[float]] = {}
    for a in run["analyses"]:
        sums: Dict[int, float] = {}
        for name, value in a.get("update_norm", {}).items():
            layer = int(name.split(".")[2])  # model.layers.{l}.…
            sums[layer] = sums.get(layer, 0.0) + value
        for layer, v in sums.items():
            per.setdefault(layer, []).append(v)
    return {l: sum(v) / len(v) for l, v in per.items()}


def allocation_markdown(results: Dict) -> str:
    """One markdown table per algorithm of a ``compare`` run (every rule: the
    ``allocation`` metrics with their 95% bootstrap intervals, and the paired difference
    to ``replay`` on the same edits), then its per-layer update norms and residual ratios
    (the issue-16 allocation sweep, docs/results.md "Sharing the replayed residual")."""
    ms = metrics("allocation")
    lines = []
    for base, runs in _by_algorithm(results).items():
        ref = runs.get(ALLOCATION_REFERENCE)
        layers = sorted({l for run in runs.values() for l in run["layers"]})
        lines += [f"\n{base}, {results['n']} edits (paired: rule - {ALLOCATION_REFERENCE} on the same edits)\n",
                  "| rule | " + " | ".join(m.label for m in ms) + " | "
                  + " | ".join(f"paired {m.label}" for m in ms) + " |",
                  "|---|" + "---|" * (2 * len(ms))]
        for mode, run in runs.items():
            cells = [fmt(run["summary"][m.key]) for m in ms]
            if ref is None or mode == ALLOCATION_REFERENCE:
                paired = ["-"] * len(ms)
            else:
                paired = [fmt(paired_difference(run["per_edit"], ref["per_edit"], m.key), signed=True) for m in ms]
            lines.append(f"| {mode} | " + " | ".join(cells + paired) + " |")
        lines += ["", "| rule | " + " | ".join(f"norm dW layer {l}" for l in layers) + " | "
                  + " | ".join(f"ratio layer {l}" for l in layers) + " |",
                  "|---|" + "---|" * (2 * len(layers))]
        for mode, run in runs.items():
            norms, ratios = update_norms(run), run["diagnostics"]["residual_ratio"]
            lines.append(f"| {mode} | " + " | ".join(f"{norms[l]:.2f}" if l in norms else "-" for l in layers)
                         + " | " + " | ".join(f"{ratios[str(l)]:.2f}" if str(l) in ratios else "-"
                                              for l in layers) + " |")
    return "\n".join(lines)


def write_allocation(results: Dict, out: Path) -> List[Path]:
    """``out/report.md`` (:func:`allocation_markdown`) and the two allocation plots."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(allocation_markdown(results).lstrip("\n") + "\n")
    return [out / "report.md"] + plot_allocation(results, out, _by_algorithm(results), update_norms)


def markdown(source, modes: Optional[Sequence[str]] = None, allocation: bool = False, out=None) -> str:
    """``report --markdown``: the condensed tables of ``source``, a ``scale --out`` folder
    (it has ``cells/``) or a ``compare`` ``results.json``; with ``allocation``, the
    allocation tables of that results file (and with ``out`` its ``report.md`` and plots).

    Raises:
        ReplayError: ``source`` is neither; ``allocation`` with anything but a results.json;
            ``modes`` with a results.json (its tables are printed whole); those of
            :func:`scale_markdown`.
    """
    from ..errors import ReplayError

    path = Path(source)
    if allocation and not path.is_file():
        sizes = sorted(path.glob("n*/results.json")) if path.is_dir() else []
        what = ("a scale --out folder" if (path / "cells").is_dir() else "a folder" if path.is_dir()
                else "no such file")
        raise ReplayError(f"report {source} --allocation: {what}; --allocation reads a compare results.json "
                          f"(`compare --out DIR` writes DIR/results.json"
                          + (f"; a scale folder holds one per size, e.g. {sizes[0]}" if sizes else "") + ")")
    if path.is_dir() and (path / "cells").is_dir():
        return scale_markdown(path, modes)
    if not path.is_file():
        raise ReplayError(f"report --markdown {source}: expected a results.json of compare or a scale --out "
                          f"folder (with cells/)")
    if modes:
        raise ReplayError(f"report {source} --modes {','.join(modes)}: --modes picks the modes of scale cells; "
                          f"a compare results.json is reported whole (drop --modes)")
    results = json.loads(path.read_text())
    if not allocation:
        return compare_markdown(results)
    text = allocation_markdown(results)
    if out is not None:
        written = write_allocation(results, Path(out))
        text += "\n" + "\n".join(f"wrote {p}" for p in written)
    return text + "\n"
