"""Condensed markdown tables of a ``compare`` run, as pasted into README "Results".

    python tools/readme_tables.py docs/results/cf48_all/results.json

Prints (1) the paper's metrics plus EasyEdit's efficacy, specificity and fluency, one row
per algorithm and mode, mean [95% bootstrap interval]; (2) the residual ratio after each
edited layer (the paper's Tables 2 and 5); (3) the passive cosine (Table 1). Every number
is read from the results file written by ``easyedit-replay compare --out DIR``.
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


if __name__ == "__main__":
    main(sys.argv[1])
