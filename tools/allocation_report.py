"""The allocation sweep of issue 16 (docs/results.md, "Sharing the replayed residual"), read from
``easyedit-replay compare --out DIR`` results:

    python tools/allocation_report.py docs/results/cf192_alloc/results.json --out docs/results/cf192_alloc

Prints one markdown table per algorithm (every rule: efficacy and generalization
Accuracy, DKL, Top-1, each with its 95% bootstrap interval, and the paired
difference to ``replay`` (FE) on the same edits with a paired bootstrap interval),
and writes two plots:

- ``allocation_tradeoff.png``: generalization Acc against efficacy Acc and DKL
  against efficacy Acc, one point per rule with its intervals, a panel pair per
  algorithm;
- ``allocation_layers.png``: the per-layer ``||dW_l||_F`` (mean over batches) and the
  residual-ratio profile (the paper's Tables 2/5) per rule, a column per algorithm.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

from easyedit_replay.scale import paired_difference

COLUMNS = (("efficacy_exact", "eff. Acc"), ("generalization_exact", "gen. Acc"), ("locality_dkl", "DKL"),
           ("locality_top1", "Top-1"))
REFERENCE = "replay"


def _cell(stat, digits=2, sign=False) -> str:
    mean, lo, hi = stat
    if mean is None:
        return "-"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def by_algorithm(results: Dict) -> Dict[str, Dict[str, Dict]]:
    out: Dict[str, Dict[str, Dict]] = {}
    for key, run in results["runs"].items():
        base, mode = key.split("/", 1)
        out.setdefault(base, {})[mode] = run
    return out


def tables(results: Dict) -> List[str]:
    lines = []
    for base, runs in by_algorithm(results).items():
        ref = runs.get(REFERENCE)
        lines += [f"\n{base}, {results['n']} edits (paired: rule - {REFERENCE} on the same edits)\n",
                  "| rule | " + " | ".join(h for _, h in COLUMNS) + " | "
                  + " | ".join(f"paired {h}" for _, h in COLUMNS) + " |",
                  "|---|" + "---|" * (2 * len(COLUMNS))]
        for mode, run in runs.items():
            cells = [_cell(run["summary"][k]) for k, _ in COLUMNS]
            if ref is None or mode == REFERENCE:
                paired = ["-"] * len(COLUMNS)
            else:
                paired = [_cell(paired_difference(run["per_edit"], ref["per_edit"], k), sign=True)
                          for k, _ in COLUMNS]
            lines.append(f"| {mode} | " + " | ".join(cells + paired) + " |")
        lines += ["", "| rule | " + " | ".join(f"norm dW layer {l}" for l in _layers(runs)) + " | "
                  + " | ".join(f"ratio layer {l}" for l in _layers(runs)) + " |",
                  "|---|" + "---|" * (2 * len(_layers(runs)))]
        for mode, run in runs.items():
            norms, ratios = update_norms(run), run["diagnostics"]["residual_ratio"]
            lines.append(f"| {mode} | " + " | ".join(f"{norms[l]:.2f}" if l in norms else "-" for l in _layers(runs))
                         + " | " + " | ".join(f"{ratios[str(l)]:.2f}" if str(l) in ratios else "-"
                                              for l in _layers(runs)) + " |")
    return lines


def _layers(runs) -> List[int]:
    return sorted({l for run in runs.values() for l in run["layers"]})


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


def plots(results: Dict, out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algs = by_algorithm(results)
    fig, axes = plt.subplots(len(algs), 2, figsize=(11, 4.2 * len(algs)), squeeze=False)
    for row, (base, runs) in enumerate(algs.items()):
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

    fig, axes = plt.subplots(2, len(algs), figsize=(5.5 * len(algs), 8), squeeze=False)
    for col, (base, runs) in enumerate(algs.items()):
        for mode, run in runs.items():
            norms = update_norms(run)
            ratios = run["diagnostics"]["residual_ratio"]
            style = "s-" if mode.startswith("replay") else "o--"
            axes[0][col].plot(sorted(norms), [norms[l] for l in sorted(norms)], style, label=mode)
            layers = sorted(int(l) for l in ratios)
            axes[1][col].plot(layers, [ratios[str(l)] for l in layers], style, label=mode)
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results.json of `easyedit-replay compare --out DIR`")
    p.add_argument("--out", help="directory for report.md and the two PNG plots (default: beside the results)")
    args = p.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    text = "\n".join(tables(results))
    print(text)
    out = Path(args.out or Path(args.results).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text.lstrip("\n") + "\n")
    print(f"wrote {out / 'report.md'}")
    for path in plots(results, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
