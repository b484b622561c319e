"""Condensed markdown tables of a ``compare`` run, as pasted into docs/results.md.

    python tools/readme_tables.py docs/results/cf48_all/results.json
    python tools/readme_tables.py --scale docs/results/scale_cf [--modes spread,replay,blue]   # docs/results.md "Results at scale"

Prints (1) the paper's metrics plus EasyEdit's efficacy, specificity and fluency, one row
per algorithm and mode, mean [95% bootstrap interval]; (2) the residual ratio after each
edited layer (the paper's Tables 2 and 5); (3) the passive cosine (Table 1). Every number
is read from the results file written by ``easyedit-replay compare --out DIR``.

``--scale DIR`` reads the cells of ``easyedit-replay scale --out DIR`` instead and prints
one condensed table per kind (one batch at every n; each sequential series): the
paper's metrics with their 95% bootstrap intervals and, next to efficacy Acc,
generalization Acc and DKL, the paired difference ``mode - spread`` on the same edits
(in a sequential series: all edits made so far) with its paired bootstrap interval
(``*``: the interval excludes 0). Planned cells that
are not finished are listed as missing rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (("efficacy_win", "eff. Success"), ("efficacy_exact", "eff. Acc"), ("generalization_win", "gen. Success"),
           ("generalization_exact", "gen. Acc"), ("locality_dkl", "DKL"), ("locality_top1", "Top-1"),
           ("locality_top10", "Top-10"), ("efficacy_acc", "token eff."), ("specificity", "locality"),
           ("fluency", "fluency"))


def cell(stat, digits=2) -> str:
    mean, lo, hi = stat
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def main(path: str) -> None:
    results = json.loads(Path(path).read_text())
    print(f"{results['n']} edits from {results.get('data')}, one batch\n")
    print("| algorithm | mode | " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    un = results["unedited"]["summary"]
    print("| - | unedited | " + " | ".join(cell(un[k]) for k, _ in COLUMNS) + " |")
    for key, run in results["runs"].items():
        base, mode = key.split("/")
        print(f"| {base} | {mode} | " + " | ".join(cell(run["summary"][k]) for k, _ in COLUMNS) + " |")
    for name, title in (("residual_ratio", "residual ratio after each edited layer"),
                        ("passive_cosine", "passive cosine")):
        layers = sorted({int(l) for r in results["runs"].values() for l in r["diagnostics"][name]})
        print(f"\n{title}\n")
        print("| algorithm | mode | " + " | ".join(f"layer {l}" for l in layers) + " |")
        print("|---|---|" + "---|" * len(layers))
        for key, run in results["runs"].items():
            values = run["diagnostics"][name]
            print("| " + " | ".join(key.split("/")) + " | "
                  + " | ".join(f"{values[str(l)]:.2f}" if str(l) in values else "-" for l in layers) + " |")


SCALE_COLUMNS = (("efficacy_exact", "eff. Acc", True), ("generalization_exact", "gen. Acc", True),
                 ("locality_dkl", "DKL", True), ("locality_top1", "Top-1", False), ("fluency", "fluency", False),
                 ("final_ratio", "final resid. ratio", False))


def _scale_rows(first: str, cells: dict, modes) -> list:
    """``(key, markdown row)``, one per ``"ALG/mode"`` of ``cells`` (``{key: (summary, per-edit rows)}``,
    one batch of n or one sequential step): each SCALE_COLUMNS metric with its interval
    and, where marked, ``mode - spread`` on the same edits with its paired interval
    (pairs from ``scale.against_spread``, as in report.md)."""
    from easyedit_replay.scale import _fmt, _marked, _order, against_spread, paired_difference

    reference = {f"{alg}/{mode}": ref for alg, mode, _, ref in
                 against_spread({key: per_edit for key, (_, per_edit) in cells.items()})}
    rows = []
    for key, (summary, per_edit) in sorted(cells.items(), key=_order):
        if modes and key.split("/")[1] not in modes:
            continue
        row = [first, *key.split("/")]
        for k, _, paired in SCALE_COLUMNS:
            row.append(_fmt(tuple(summary[k])))
            if paired:
                row.append(_marked(paired_difference(per_edit, reference[key], k)) if key in reference else "-")
        rows.append((key, "| " + " | ".join(row) + " |"))
    return rows


def scale_tables(out_dir: str, modes=None) -> None:
    """The "Results at scale" tables of docs/results.md from ``scale --out DIR`` cells (only the
    ``modes`` listed, all when None): one batch at every n, then each sequential series
    by edits made (rows grouped by algorithm and mode), both with the paired columns,
    and the missing cells."""
    from easyedit_replay.scale import _describe, _order, collect_cells, missing_cells, sequential_steps

    found = collect_cells(out_dir)

    def header(first):
        head = [first, "algorithm", "mode"]
        for _, label, paired in SCALE_COLUMNS:
            head += [label] + ([f"{label} - spread"] if paired else [])
        return "| " + " | ".join(head) + " |\n|" + "---|" * len(head)

    if found["batch"]:
        print(header("n"))
    for n in sorted(found["batch"]):
        cells = {key: (c["run"]["summary"], c["run"]["per_edit"]) for key, c in found["batch"][n].items()}
        print("\n".join(row for _, row in _scale_rows(str(n), cells, modes)))
    for (b, total), series in sorted(found["sequential"].items()):
        print(f"\nsequential: {total} edits in batches of {b}\n\n" + header("edits made"))
        rows = [(_order(key), made, row) for made, cells in sequential_steps(series).items()
                for key, row in _scale_rows(str(made), {k: (c["summary"], c["per_edit"]) for k, c in cells.items()},
                                            modes)]
        print("\n".join(row for *_, row in sorted(rows)))
    missing = missing_cells(out_dir)
    if missing:
        print("\nmissing (planned, not finished):\n")
        for cell in missing:
            print(f"- {_describe(cell)}")


if __name__ == "__main__":
    if sys.argv[1] == "--scale":  # --scale DIR [--modes spread,replay,blue]
        chosen = sys.argv[sys.argv.index("--modes") + 1].split(",") if "--modes" in sys.argv else None
        scale_tables(sys.argv[2], chosen)
    else:
        main(sys.argv[1])
