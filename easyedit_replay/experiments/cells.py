"""The cells of ``scale`` on disk: paths, the settings a cell is keyed by and their
digest, reading (with the settings check that makes a rerun resume, never mix) and
atomic writing, the plan (``scale.json``), and collecting every finished cell.

    cells/unedited/n00048.json                      the unedited model on records[:48]
    cells/batch/n00048/MEMIT__replay.json           one batch of 48
    cells/seq_b0096_n00768/AlphaEdit__spread/step003.json
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from dataclasses import MISSING, fields
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..errors import ReplayError
from ..files import atomic_write_text
from ..provenance import provenance
from .metrics import RunKey, run_order

log = logging.getLogger("easyedit_replay.scale")

# hparams fields that do not change what a cell measures (paths, caching, chunking)
# and labels (the operating point's name and source: its values key the cell)
UNKEYED_HPARAMS = ("stats_dir", "anchor_cache", "anchor_batch_size", "device", "model_parallel",
                   "operating_point", "hparams_source")


def digest(obj) -> str:
    """A 32-hex-digit digest of ``obj``'s JSON (keys sorted)."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def records_digest(records: Sequence[dict]) -> str:
    """Digest of the records' edit and evaluation fields (what a cell was measured on)."""
    return digest([{k: r.get(k) for k in sorted(r)} for r in records])


def hparams_settings(hp) -> dict:
    """The hyperparameters a cell is keyed by: every field of ``hp.to_dict()`` except
    :data:`UNKEYED_HPARAMS` and the fields at their dataclass default (so a field added
    to the hyperparameters later, at a default that keeps the old behaviour, does not
    orphan the cells made before it existed)."""
    defaults = {}
    for f in fields(hp):
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:
            defaults[f.name] = f.default_factory()
    return {k: v for k, v in hp.to_dict().items()
            if k not in UNKEYED_HPARAMS and not (k in defaults and defaults[k] == v)}


# ----------------------------------------------------------------------------- paths


def unedited_path(out: Path, n: int) -> Path:
    """The unedited model's cell on the first ``n`` records: ``out/cells/unedited/n{n:05d}.json``."""
    return out / "cells" / "unedited" / f"n{n:05d}.json"


def batch_path(out: Path, n: int, alg: str, mode: str) -> Path:
    """One batch edit's cell: ``out/cells/batch/n{n:05d}/{alg}__{mode}.json``."""
    return out / "cells" / "batch" / f"n{n:05d}" / f"{alg}__{mode}.json"


def series_dir(out: Path, b: int, total: int, alg: str, mode: str) -> Path:
    """The folder of one sequential series (batches of ``b``, ``total`` edits):
    ``out/cells/seq_b{b:04d}_n{total:05d}/{alg}__{mode}``."""
    return out / "cells" / f"seq_b{b:04d}_n{total:05d}" / f"{alg}__{mode}"


def step_path(out: Path, b: int, total: int, alg: str, mode: str, step: int) -> Path:
    """One step's cell of a sequential series: ``series_dir(...)/step{step:03d}.json``."""
    return series_dir(out, b, total, alg, mode) / f"step{step:03d}.json"


def cell_path(out: Path, cell: dict) -> Path:
    """The file of a planned cell (:func:`planned_cells`)."""
    if cell["kind"] == "batch":
        return batch_path(out, cell["n"], cell["alg"], cell["mode"])
    return step_path(out, cell["batch_size"], cell["total"], cell["alg"], cell["mode"], cell["step"])


# ----------------------------------------------------------------------------- reading and writing


def read_cell(path: Path, settings: dict) -> Optional[dict]:
    """The finished cell at ``path``, or None when there is none.

    Raises:
        ReplayError: the cell was made with other settings (names the fields that
            differ); delete it or pick another ``--out`` to recompute.
    """
    if not path.exists():
        return None
    try:
        cell = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("scale cell %s is unreadable (%s); recomputing it", path, exc)
        return None
    if cell.get("settings_digest") != digest(settings):
        old = cell.get("settings", {})
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        detail = []
        if "hparams" in differ:
            hp_old, hp_new = old.get("hparams") or {}, settings.get("hparams") or {}
            detail = [f"hparams.{k}" for k in sorted(set(hp_old) | set(hp_new)) if hp_old.get(k) != hp_new.get(k)]
        raise ReplayError(
            f"scale cell {path} was made with other settings ({', '.join(detail + [f for f in differ if f != 'hparams'])} "
            f"differ); delete it, or pass another --out, to recompute it")
    return cell


def write_cell(path: Path, cell: dict, settings: dict) -> None:
    """Write ``cell`` (plus its settings and their digest, the time it finished and its
    ``provenance``: the package version and commit, :func:`~easyedit_replay.provenance.provenance`)
    atomically. Every cell of ``scale`` and ``tune`` is written here. ``provenance`` is
    not a setting: no reader uses it, and a cell written before it existed loads the same."""
    cell = dict(cell, settings=settings, settings_digest=digest(settings),
                finished=datetime.datetime.now().isoformat(timespec="seconds"), provenance=provenance())
    atomic_write_text(path, json.dumps(cell, indent=1, default=str))


# ----------------------------------------------------------------------------- the plan


def steps_of(total: int, b: int) -> List[List[int]]:
    """The record indices of each step of a series of ``total`` edits in batches of ``b``."""
    return [list(range(i, min(i + b, total))) for i in range(0, total, b)]


def planned_cells(cfg, algs: Sequence[str]) -> List[dict]:
    """The cells a ``scale`` invocation (a :class:`~easyedit_replay.experiments.scale.ScaleConfig`)
    makes: ``{"kind", "n" | ("batch_size", "total", "step", "edits"), "alg", "mode"}``."""
    cells = []
    if cfg.sequential:
        total = max(cfg.sizes)
        for alg in algs:
            for mode in cfg.modes:
                for k, idx in enumerate(steps_of(total, cfg.batch_size)):
                    cells.append({"kind": "sequential", "batch_size": int(cfg.batch_size), "total": total,
                                  "step": k + 1, "edits": idx[-1] + 1, "alg": alg, "mode": mode})
    else:
        for n in sorted(cfg.sizes):
            for alg in algs:
                for mode in cfg.modes:
                    cells.append({"kind": "batch", "n": n, "alg": alg, "mode": mode})
    return cells


def cell_edits(cell: dict) -> int:
    """The edits a planned cell makes (progress bars)."""
    return cell["n"] if cell["kind"] == "batch" else cell["edits"] - (cell["step"] - 1) * cell["batch_size"]


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):
        return False


def update_plan(out: Path, plan: List[dict], meta: Optional[dict]) -> None:
    """Add ``plan``'s cells (and ``meta``) to ``out/scale.json``. A ``meta["data"]``
    naming the file the plan already records under another spelling (an absolute path
    for a relative one; both read from the working folder) keeps the recorded spelling,
    so a re-plan does not churn it."""
    path = out / "scale.json"
    data = json.loads(path.read_text()) if path.exists() else {"planned": [], "meta": {}}
    known = {json.dumps(c, sort_keys=True) for c in data["planned"]}
    data["planned"] += [c for c in plan if json.dumps(c, sort_keys=True) not in known]
    meta = dict(meta or {})
    recorded = data["meta"].get("data")
    if meta.get("data") and recorded and _same_file(recorded, meta["data"]):
        meta["data"] = recorded
    data["meta"].update(meta)
    atomic_write_text(path, json.dumps(data, indent=1))


def plan_points(meta: Optional[dict]) -> Tuple[str, ...]:
    """The operating points a ``scale.json``'s ``meta`` names: its ``operating_point``,
    one name (a string) or several (a list), as a tuple; empty when ``meta`` names none.

    >>> plan_points({"operating_point": "paper"}), plan_points({"operating_point": ["bundled"]})
    (('paper',), ('bundled',))
    """
    named = (meta or {}).get("operating_point")
    if not named:
        return ()
    return (named,) if isinstance(named, str) else tuple(named)


def plan_meta(out_dir) -> dict:
    """The ``meta`` of ``out_dir/scale.json`` (``model``, ``data``, ``records``,
    ``operating_point``: :func:`update_plan`); empty when the folder has no ``scale.json``."""
    plan = Path(out_dir) / "scale.json"
    return (json.loads(plan.read_text()).get("meta") or {}) if plan.exists() else {}


def recorded_points(out_dir) -> Tuple[str, ...]:
    """The operating points ``out_dir/scale.json`` names (:func:`plan_points` of its
    ``meta``); empty when the folder has no ``scale.json``."""
    return plan_points(plan_meta(out_dir))


def cell_points(found: dict) -> Tuple[Tuple[str, ...], int]:
    """``(points, unnamed)``: the operating points the edit cells of ``found``
    (:func:`collect_cells`) name in their ``operating_point``, sorted, and how many cells
    lack the field (made before it existed)."""
    cells = edit_cells(found)
    return (tuple(sorted({c["operating_point"] for c in cells if c.get("operating_point")})),
            sum(1 for c in cells if not c.get("operating_point")))


def folder_points(out_dir, found: dict) -> List[str]:
    """The operating points a ``scale --out`` folder holds, sorted: its cells'
    ``operating_point`` (:func:`cell_points` of ``found``, its :func:`collect_cells`)
    and, when a cell lacks the field or there is no cell, the points its ``scale.json``
    names (:func:`recorded_points`); empty when it records none."""
    named, unnamed = cell_points(found)
    return sorted(set(named) | (set(recorded_points(out_dir)) if unnamed or not named else set()))


def check_out_point(out_dir, points: Sequence[str]) -> None:
    """Refuse to plan or make cells at the operating points ``points`` in a ``scale
    --out`` folder that holds cells, or a plan, at other points; one folder is one point
    (``report --points`` reads a folder's point from its cells and its ``scale.json``).
    The folder's points are its cells' ``operating_point`` (:func:`cell_points`) and, when
    a cell lacks the field or there is no cell, the points its ``scale.json`` names
    (:func:`recorded_points`). A folder that records no point (new, or only cells older than
    the field and a plan naming none) takes any.

    Raises:
        ReplayError: the folder's points are not ``points``: names ``--out``, the points
            it holds and ``--point``.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return
    found = collect_cells(out)
    named, unnamed = cell_points(found)
    held = folder_points(out, found)
    if held and held != sorted(set(points)):
        what = "cells" if named or unnamed else "a plan (scale.json)"
        asked = ", ".join(sorted(set(points)))
        raise ReplayError(f"--out {out} holds {what} at {', '.join(held)} (this run: {asked}); use --point {held[0]} "
                          f"or another --out")


def _records_spelling(text) -> tuple:
    """``--records`` as ``((start, stop), ...)``, ``":"`` and ``"0:"`` alike (a spelling that
    does not parse is kept as it is)."""
    from ..data import parse_records

    try:
        ranges = parse_records(str(text))
    except ReplayError:
        return (str(text),)
    return tuple((r.start or 0, r.stop) for r in ((ranges,) if isinstance(ranges, slice) else ranges))


def check_out_data(out_dir, meta: dict) -> None:
    """Refuse to plan or make cells of ``meta["data"]`` / ``meta["records"]`` (this run's
    ``--data`` and ``--records``) in a ``scale --out`` folder whose ``scale.json`` records
    another data file or range, before the model loads and before ``scale.json`` is
    rewritten (its cells would fail their settings check one by one). The same file under
    another spelling (a relative and an absolute path) is the same data; a recorded path
    that does not resolve from here is left to the cells' own check of their records.

    Raises:
        ReplayError: names ``--out``, the data and records it holds, and this run's.
    """
    held = plan_meta(out_dir)
    data, records = held.get("data"), held.get("records")
    both_files = data and os.path.isfile(data) and os.path.isfile(meta["data"])
    other_data = data and data != meta["data"] and not _same_file(data, meta["data"]) and (
        both_files or "demo" in (data, meta["data"]))
    other_records = records and _records_spelling(records) != _records_spelling(meta["records"])
    if other_data or other_records:
        raise ReplayError(f"--out {out_dir} holds cells of --data {data} --records {records} (this run: --data "
                          f"{meta['data']} --records {meta['records']}); pass those, or another --out")


def missing_cells(out_dir, found: Optional[dict] = None) -> List[dict]:
    """Planned cells (``scale.json``) with no finished cell file."""
    out = Path(out_dir)
    path = out / "scale.json"
    if not path.exists():
        return []
    plan = json.loads(path.read_text())["planned"]
    return [c for c in plan if not cell_path(out, c).exists()]


def describe(cell: dict) -> str:
    """A planned cell in words (the report's missing-cells list)."""
    run = RunKey(cell["alg"], cell["mode"]).text
    if cell["kind"] == "batch":
        return f"one batch, n = {cell['n']}, {run}"
    return (f"sequential {cell['total']} in batches of {cell['batch_size']}, step {cell['step']} "
            f"({cell['edits']} edits made), {run}")


# ----------------------------------------------------------------------------- collecting


def collect_cells(out_dir) -> dict:
    """Every finished cell under ``out_dir/cells``: ``{"unedited": {n: cell}, "batch": {n:
    {"ALG/mode": cell}}, "sequential": {(b, total): {"ALG/mode": [step cells]}}}``."""
    out = Path(out_dir) / "cells"
    found = {"unedited": {}, "batch": {}, "sequential": {}}
    for path in sorted(out.glob("unedited/n*.json")):
        cell = json.loads(path.read_text())
        found["unedited"][cell["n"]] = cell
    for path in sorted(out.glob("batch/n*/*.json")):
        cell = json.loads(path.read_text())
        found["batch"].setdefault(cell["n"], {})[RunKey(cell["alg"], cell["mode"]).text] = cell
    for path in sorted(out.glob("seq_b*/*/step*.json")):
        cell = json.loads(path.read_text())
        series = found["sequential"].setdefault((cell["batch_size"], cell["total"]), {})
        series.setdefault(RunKey(cell["alg"], cell["mode"]).text, []).append(cell)
    for series in found["sequential"].values():
        for steps in series.values():
            steps.sort(key=lambda c: c["step"])
    return found


def edit_cells(found: dict) -> List[dict]:
    """The one-batch and sequential cells of ``found`` (:func:`collect_cells`), not the unedited ones."""
    return ([c for by_key in found["batch"].values() for c in by_key.values()]
            + [c for series in found["sequential"].values() for steps in series.values() for c in steps])


def check_modes(modes: Optional[Sequence[str]], founds: Sequence[dict], where: str) -> None:
    """Refuse a ``--modes`` entry that names no mode of the finished edit cells of
    ``founds`` (each a :func:`collect_cells` result); None or empty ``modes``: nothing to check.

    Raises:
        ReplayError: naming ``where`` (the command), ``--modes``, the entries that match no
            cell and the modes the cells have.
    """
    present = sorted({c["mode"] for found in founds for c in edit_cells(found)}, key=lambda m: run_order(RunKey("", m)))
    unknown = [m for m in modes or () if m not in present]
    if unknown:
        raise ReplayError(f"{where} --modes {','.join(modes)}: {', '.join(map(repr, unknown))} "
                          f"{'names' if len(unknown) == 1 else 'name'} no mode of the cells; the modes present are "
                          f"{', '.join(present) if present else 'none (no finished cells)'}")


def results_for_n(found: dict, n: int, meta: dict) -> dict:
    """A ``compare``-format results dict of the one-batch cells of size ``n``."""
    runs = {key: cell["run"] for key, cell in sorted(found["batch"].get(n, {}).items(), key=run_order)}
    un = found["unedited"].get(n)
    return {"n": n, "data": meta.get("data"), "model": meta.get("model"),
            "unedited": {"per_edit": un["per_edit"], "summary": un["summary"]} if un else None, "runs": runs}
