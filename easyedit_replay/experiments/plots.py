"""The PNG plots of ``compare``, ``scale`` and the allocation report (matplotlib, Agg).

Every line of a mode takes :func:`~easyedit_replay.experiments.metrics.mode_style`'s
marker and line style, so a construction looks the same in every plot; a plot
function returns its path, or None when it has nothing to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from .metrics import RunKey, metric, metrics, mode_style, run_order
from .statistics import finite, paired_difference
from .tables import against_spread, batch_per_edit, sequential_per_edit, summary_stat


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, path: Path, title: str, fontsize: int, dpi: int = 110) -> Path:
    """Title, tight layout, write ``path``, close the figure; returns ``path``."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _panel_row(n: int):
    """``(plt, fig, axes)``: one row of ``n`` panels, one per algorithm."""
    plt = _plt()
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    return plt, fig, axes[0]


def _runs_of(results, alg: str):
    """``(mode, run)`` of ``alg`` in a ``compare`` results dict."""
    for key, run in results["runs"].items():
        k = RunKey.parse(key)
        if k.alg == alg:
            yield k.mode, run


# ----------------------------------------------------------------------------- compare


def plot_target_error(results, path: Path) -> Optional[Path]:
    """Per-layer mean relative target error, spread vs replay, one panel per algorithm."""
    import torch

    algs = sorted({RunKey.parse(k).alg for k, r in results["runs"].items() if r["target_accuracy"]})
    if not algs:
        return None
    plt, fig, row = _panel_row(len(algs))
    for ax, alg in zip(row, algs):
        for mode, run in _runs_of(results, alg):
            if not run["target_accuracy"]:
                continue
            layers = run["edit_layers"]
            per_layer = torch.tensor([[s["mean_by_layer"] for s in b["sites"]] for b in run["target_accuracy"]])
            marker, style = mode_style(mode)
            ax.plot(layers, per_layer.mean(dim=(0, 1)).tolist(), marker=marker, linestyle=style, label=mode)
        ax.set_title(alg)
        ax.set_xlabel("edit layer")
        ax.set_ylabel("|h - target| / |target|")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
        ax.legend()
    return _finish(plt, fig, path, "target error per edit layer after the edit (lower is better)", 9)


def plot_residual_ratio(results, path: Path) -> Optional[Path]:
    """Residual ratio at ``l_n`` vs edit layer, one line per mode, one panel per algorithm
    (the paper's convergence claim: replay's ratio falls fastest)."""
    algs = list(dict.fromkeys(RunKey.parse(k).alg for k in results["runs"]))
    if not algs:
        return None
    plt, fig, row = _panel_row(len(algs))
    for ax, alg in zip(row, algs):
        for mode, run in _runs_of(results, alg):
            values = run["diagnostics"]["residual_ratio"]
            layers = sorted(int(l) for l in values)
            marker, style = mode_style(mode)
            ax.plot(layers, [values[str(l)] for l in layers], marker=marker, linestyle=style, label=mode)
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_title(alg)
        ax.set_xlabel("after editing layer")
        ax.set_ylabel("|m_L - h_L| / |m_L - h_L(unedited)|")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _finish(plt, fig, path, "final-layer residual left after each edited layer (lower is better)", 9)


def plot_sequential(results, path: Path) -> Optional[Path]:
    """Efficacy and generalization Success and DKL of all edits so far vs number of edits
    (a sequential ``compare`` run's ``curve``)."""
    runs = {k: r for k, r in results["runs"].items() if r["curve"]}
    if not runs:
        return None
    shown = [metric(k) for k in ("efficacy_win", "generalization_win", "locality_dkl")]
    plt = _plt()
    fig, axes = plt.subplots(1, len(shown), figsize=(13, 3.6))
    for key, run in sorted(runs.items()):
        marker, style = mode_style(RunKey.parse(key).mode)
        xs = [c["edits"] for c in run["curve"]]
        for ax, m in zip(axes, shown):
            ax.plot(xs, [c[m.key] for c in run["curve"]], linestyle=style, marker=".", label=key)
            ax.set_title(m.label + ("" if m.higher_is_better else " (lower is better)"))
            ax.set_xlabel("edits applied")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _finish(plt, fig, path, "sequential editing: metrics of all edits so far (solid: replay, dashed: spread)",
                   10)


# ----------------------------------------------------------------------------- scale


def plot_bands(lines: List[tuple], path: Path, title: str, xlabel: str, log_x: bool = True,
               differences: bool = False) -> Optional[Path]:
    """One panel row per algorithm, one column per ``scale`` metric, one line per ``(alg,
    label, mode, points)`` in ``lines`` with ``points = {metric: [(x, (mean, lo, hi))]}``,
    its interval as a band (an error bar for a line of one point; non-finite points left
    out), each mode in one color throughout. ``differences``: a zero line, and titles say
    which sign is better."""
    algs = list(dict.fromkeys(alg for alg, *_ in lines))
    if not algs:
        return None
    shown = metrics("scale")
    colors = {mode: f"C{i % 10}" for i, mode in enumerate(dict.fromkeys(mode for _, _, mode, _ in lines))}
    plt = _plt()
    fig, axes = plt.subplots(len(algs), len(shown), figsize=(3.1 * len(shown), 2.6 * len(algs)), squeeze=False)
    fig.suptitle(title, fontsize=10)
    for r, alg in enumerate(algs):
        for line_alg, label, mode, points in lines:
            if line_alg != alg:
                continue
            marker, style = mode_style(mode)
            for c, m in enumerate(shown):
                pts = [(x, st) for x, st in points.get(m.key, []) if finite(st)]
                if not pts:
                    continue
                ax = axes[r][c]
                xs = [x for x, _ in pts]
                ax.plot(xs, [st[0] for _, st in pts], marker=marker, linestyle=style, label=label,
                        color=colors[mode])  # one color per mode in every panel
                ax.fill_between(xs, [st[1] for _, st in pts], [st[2] for _, st in pts], alpha=0.15,
                                color=colors[mode])
                if len(pts) == 1:  # a band needs two points: the interval as an error bar
                    (x, (mean, lo, hi)), = pts
                    ax.errorbar([x], [mean], yerr=[[mean - lo], [hi - mean]], color=colors[mode], capsize=3)
        for c, m in enumerate(shown):
            ax = axes[r][c]
            if log_x and ax.lines:
                ax.set_xscale("log", base=2)
            if differences:
                ax.axhline(0.0, color="grey", linewidth=0.7)
                ax.set_title(f"{alg}: {m.label} ({'+' if m.higher_is_better else '-'} = better)", fontsize=8)
            else:
                ax.set_title(f"{alg}: {m.label}" + ("" if m.higher_is_better else " (lower better)"), fontsize=8)
            ax.set_xlabel(xlabel, fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        axes[r][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_scale(found: dict, path: Path) -> Optional[Path]:
    """The paper's metrics vs ``n`` (one batch), one line per algorithm and mode, 95%
    bootstrap intervals as bands."""
    keys = sorted({k for cells in found["batch"].values() for k in cells}, key=run_order)
    lines = []
    for key in keys:
        k = RunKey.parse(key)
        ns = sorted(n for n, cells in found["batch"].items() if key in cells)
        lines.append((k.alg, k.mode, k.mode, {m.key: [(n, summary_stat(found["batch"][n][key]["run"]["summary"], m.key))
                                                    for n in ns] for m in metrics("scale")}))
    return plot_bands(lines, path, "one batch of n edits: mean over edits, 95% bootstrap band", "edits in the batch")


def paired_lines(groups: Dict[int, Dict[str, list]], suffix: str, n_boot: int, seed: int) -> List[tuple]:
    """:func:`plot_bands` lines of ``mode - spread`` against ``x`` for ``groups = {x:
    {"ALG/mode": per-edit rows}}``, one line per algorithm and non-spread mode."""
    points: Dict[RunKey, dict] = {}
    for x, per_edit_by_key in groups.items():
        for alg, mode, per_edit, ref in against_spread(per_edit_by_key):
            line = points.setdefault(RunKey(alg, mode), {m.key: [] for m in metrics("scale")})
            for m in metrics("scale"):
                line[m.key].append((x, paired_difference(per_edit, ref, m.key, n_boot, seed)))
    return [(k.alg, k.mode + suffix, k.mode, pts) for k, pts in sorted(points.items(), key=run_order)]


def plot_paired(found: dict, path: Path, n_boot: int, seed: int) -> Optional[Path]:
    """``mode - spread`` on the same edits vs ``n``, 95% paired bootstrap bands."""
    lines = paired_lines({n: batch_per_edit(found, n) for n in sorted(found["batch"])}, "", n_boot, seed)
    return plot_bands(lines, path, "paired difference mode - spread on the same edits, 95% paired bootstrap band",
                      "edits in the batch", differences=True)


def plot_sequential_scale(found: dict, path: Path) -> Optional[Path]:
    """Sequential series: the metrics of all edits made so far vs the number made."""
    lines = []
    for (b, total), series in sorted(found["sequential"].items()):
        for key, steps in sorted(series.items(), key=run_order):
            steps = [c for c in steps if c.get("evaluated")]
            if steps:
                k = RunKey.parse(key)
                lines.append((k.alg, f"{k.mode} (batches of {b})", k.mode,
                              {m.key: [(c["edits"], summary_stat(c["summary"], m.key)) for c in steps]
                               for m in metrics("scale")}))
    return plot_bands(lines, path, "sequential editing: metrics of all edits made so far, 95% bootstrap band",
                      "edits made", log_x=False)


def plot_sequential_paired(found: dict, path: Path, n_boot: int, seed: int) -> Optional[Path]:
    """Sequential series: ``mode - spread`` on all edits made so far vs the number made,
    95% paired bootstrap bands."""
    lines = []
    for (b, total), series in sorted(found["sequential"].items()):
        lines += paired_lines(sequential_per_edit(series), f" (batches of {b})", n_boot, seed)
    return plot_bands(lines, path, "sequential editing: paired difference mode - spread on all edits made so far, "
                      "95% paired bootstrap band", "edits made", log_x=False, differences=True)


# ----------------------------------------------------------------------------- allocation


def plot_allocation(results: Dict, out: Path, by_alg: Dict[str, Dict[str, Dict]], update_norms) -> List[Path]:
    """The allocation report's two plots: ``allocation_tradeoff.png`` (generalization Acc
    and DKL against efficacy Acc, one point per rule with its intervals, a panel pair per
    algorithm) and ``allocation_layers.png`` (per-layer ``||dW_l||_F`` and the
    residual-ratio profile per rule, a column per algorithm)."""
    plt = _plt()
    fig, axes = plt.subplots(len(by_alg), 2, figsize=(11, 4.2 * len(by_alg)), squeeze=False)
    for row, (base, runs) in enumerate(by_alg.items()):
        for col, (ykey, ylabel) in enumerate((("generalization_exact", "generalization Acc"),
                                               ("locality_dkl", "DKL (lower is better)"))):
            ax = axes[row][col]
            for mode, run in runs.items():
                (x, xlo, xhi), (y, ylo, yhi) = run["summary"]["efficacy_exact"], run["summary"][ykey]
                ax.errorbar([x], [y], xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]], fmt="o",
                            capsize=3, label=mode)
                ax.annotate(mode, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xlabel("efficacy Acc")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{base}, {results['n']} edits")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "allocation_tradeoff.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(by_alg), figsize=(5.5 * len(by_alg), 8), squeeze=False)
    for col, (base, runs) in enumerate(by_alg.items()):
        for mode, run in runs.items():
            norms = update_norms(run)
            ratios = run["diagnostics"]["residual_ratio"]
            marker, style = mode_style(mode)
            axes[0][col].plot(sorted(norms), [norms[l] for l in sorted(norms)], marker=marker, linestyle=style,
                              label=mode)
            layers = sorted(int(l) for l in ratios)
            axes[1][col].plot(layers, [ratios[str(l)] for l in layers], marker=marker, linestyle=style, label=mode)
        axes[0][col].set_title(f"{base}: ||dW_l||_F per edit layer")
        axes[1][col].set_title(f"{base}: final-layer residual ratio after layer l")
        for ax in axes[:, col]:
            ax.set_xlabel("edit layer")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "allocation_layers.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
