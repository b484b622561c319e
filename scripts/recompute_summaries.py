"""Recompute, in place, the stored summaries of ``scale`` and ``tune`` cells that hold a
non-finite value (``inf``: a residual ratio divided by a zero gap, written before such a
ratio became NaN and before the statistics dropped non-finite values).

A cell's summary is :func:`easyedit_replay.experiments.statistics.summarize_ci` of its
stored per-edit rows with the ``n_boot`` and ``seed`` its settings record (as ``scale``
computes it when it writes the cell), so it can be recomputed from the cell alone. An
entry is one metric's whole ``[mean, lo, hi]`` triple: an entry holding inf or NaN is
replaced whole by its recomputation (its finite members too), and the other entries are
kept; this happens only when every finite entry of that summary recomputes to the
stored triple bit for bit (the check that the rows and options reproduce it). A cell
that fails the check, or is no cell (unreadable JSON), is named and left as it is (exit
status 1). The per-edit rows, the settings and their digest are not touched, so the cell
stays finished for a rerun; the reports are then regenerated with the commands printed
(``scale --report-only`` on a ``scale`` folder, ``tune --report-only`` on the grid that
holds one).

    python scripts/recompute_summaries.py DIR [DIR ...]            # rewrite, print what changed
    python scripts/recompute_summaries.py --dry-run DIR [DIR ...]  # print only

DIR: a ``scale --out`` folder, a ``tune --out`` grid (or one of its folders), a folder
holding several of them, or a ``cells/`` folder (every cell file below it: a ``*.json``
under a ``cells`` folder); a DIR without any is refused (exit status 1), and a cell
found under two DIRs is read once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def finite(value) -> bool:
    """Whether a stored summary entry ``[mean, lo, hi]`` holds no inf or NaN (None counts
    as finite: a metric with no value for these edits)."""
    return all(v is None or math.isfinite(v) for v in value)


def cell_files(d: Path) -> List[Path]:
    """The cell files below ``d`` (resolved, sorted): every ``*.json`` with a ``cells``
    folder above it, ``d`` itself or one below it."""
    found = (p.resolve() for p in d.glob("**/*.json"))
    return sorted(p for p in found if "cells" in p.parts[:-1])


def report_command(cell: Path) -> str:
    """The command that regenerates the report ``cell`` (resolved) is in: ``tune
    --report-only`` on the grid whose ``scale`` folder holds it, else ``scale
    --report-only`` on its ``scale`` folder (the folder above its last ``cells``)."""
    from easyedit_replay.tune import grid_of

    parts = cell.parts[:-1]
    folder = Path(*parts[:len(parts) - 1 - parts[::-1].index("cells")])
    grid = grid_of(folder)
    return f"easyedit-replay tune --report-only --out {grid}" if grid else \
        f"easyedit-replay scale --report-only --out {folder}"


def blocks(cell: dict) -> Iterator[Tuple[str, dict]]:
    """``(where, block)`` of every part of ``cell`` holding a ``summary`` of its
    ``per_edit`` rows: the cell itself (an unedited cell, an evaluated step of a
    sequential series) and its ``run`` (a one-batch cell)."""
    for where, block in (("", cell), ("run.", cell.get("run"))):
        if isinstance(block, dict) and "summary" in block and "per_edit" in block:
            yield where, block


def recompute(cell: dict) -> Tuple[List[str], Optional[str]]:
    """Replace the non-finite entries of ``cell``'s summaries by their recomputation, in
    place. Returns ``(changes, refusal)``: one line per replaced entry, and None or why
    the cell was left as it is (then nothing in it is changed)."""
    from easyedit_replay.experiments.statistics import summarize_ci

    options = (cell.get("settings") or {}).get("metrics") or {}
    if "n_boot" not in options or "seed" not in options:
        return [], "its settings record no metrics.n_boot and metrics.seed"
    updates, changes = [], []
    for where, block in blocks(cell):
        stored = block["summary"]
        if all(finite(v) for v in stored.values()):
            continue
        fresh = {k: list(v) for k, v in summarize_ci(block["per_edit"], options["n_boot"], options["seed"]).items()}
        for key, value in stored.items():
            if key not in fresh:
                return [], f"{where}summary.{key} is not a registered metric"
            if finite(value) and fresh[key] != value:
                return [], f"{where}summary.{key} recomputes to {fresh[key]}, not the stored {value}"
            if not finite(value):
                updates.append((stored, key, fresh[key]))
                changes.append(f"{where}summary.{key} {value} -> {fresh[key]}")
    for stored, key, value in updates:
        stored[key] = value
    return changes, None


def main(argv: Optional[List[str]] = None) -> int:
    """Rewrite the cells below each DIR; print each change, each refusal and the commands
    that regenerate the reports. Exit status 1 when a cell was refused or a DIR is missing."""
    from easyedit_replay.files import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="scale --out folders, tune --out grids, folders "
                   "holding them, or cells/ folders")
    p.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    args = p.parse_args(argv)
    status, rewritten, reports, seen = 0, 0, [], set()
    give = "give a scale --out folder, a tune --out grid or a cells/ folder"
    for d in map(Path, args.dirs):
        if not d.is_dir():
            print(f"{d}: no such folder ({give})", file=sys.stderr)
            status = 1
            continue
        paths = cell_files(d)
        if not paths:
            print(f"{d}: no cell files below it (*.json under a cells/ folder); {give}", file=sys.stderr)
            status = 1
        for path in paths:
            if path in seen:  # under an earlier DIR too
                continue
            seen.add(path)
            try:
                cell = json.loads(path.read_text())
                why = None if isinstance(cell, dict) else f"a JSON {type(cell).__name__}, not an object"
            except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                why = f"unreadable JSON ({exc})"
            if why:
                print(f"{path}: left as it is: not a cell: {why}", file=sys.stderr)
                status = 1
                continue
            changes, refusal = recompute(cell)
            if refusal:
                print(f"{path}: left as it is: {refusal}", file=sys.stderr)
                status = 1
            for line in changes:
                print(f"{path}: {line}")
            if changes and not refusal:
                rewritten += 1
                if report_command(path) not in reports:
                    reports.append(report_command(path))
                if not args.dry_run:
                    atomic_write_text(path, json.dumps(cell, indent=1, default=str))  # as write_cell writes it
    print(f"{rewritten} cell(s) {'would be ' if args.dry_run else ''}rewritten")
    if reports:
        print("regenerate the reports:\n" + "\n".join(f"  {c}" for c in reports))
    return status


if __name__ == "__main__":
    sys.exit(main())
