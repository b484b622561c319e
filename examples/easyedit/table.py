"""The table of examples/easyedit/side_by_side.sh runs (docs/easyedit.md).

    python examples/easyedit/table.py OUT_DIR

Reads OUT_DIR/times.tsv and each run's results JSON (written by
``run_AlphaEdit_editing.py``) and prints one Markdown row per finished run: the
means ``summary_metrics`` prints (post-edit rewrite_acc, rephrase_acc,
locality neighborhood_acc), the mean post-edit fluency (``ngram_entropy``), the
pre-edit rewrite_acc and the run's wall time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean


def _flat_mean(values) -> float:
    flat = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    return mean(float(x) for x in flat)


def row(alg: str, edits: str, seconds: str, rc: str, out: Path) -> str:
    files = sorted((out / alg).glob("*.json"))
    if rc != "0" or not files:
        return f"| {alg} | {edits} | run failed (exit code {rc}, see {alg}.log) | | | | | {float(seconds):.0f} |"
    metrics = json.loads(files[0].read_text())
    post = [m["post"] for m in metrics]
    cells = [
        _flat_mean([p["rewrite_acc"] for p in post]),
        _flat_mean([p["rephrase_acc"] for p in post]),
        _flat_mean([p["locality"]["neighborhood_acc"] for p in post]),
        mean(p["fluency"]["ngram_entropy"] for p in post),
        _flat_mean([m["pre"]["rewrite_acc"] for m in metrics]),
    ]
    return (f"| {alg} | {len(metrics)} | " + " | ".join(f"{c:.2f}" for c in cells)
            + f" | {float(seconds):.0f} |")


def main(out_dir: str) -> None:
    out = Path(out_dir)
    print("| alg_name | edits | rewrite_acc | rephrase_acc | locality (neighborhood_acc) | fluency (n-gram entropy) "
          "| pre-edit rewrite_acc | wall time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for line in (out / "times.tsv").read_text().splitlines():
        print(row(*line.split("\t"), out))


if __name__ == "__main__":
    main(*sys.argv[1:2])
