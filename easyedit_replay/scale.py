"""``easyedit-replay scale``: the comparison at growing numbers of edits, cell by cell,
resumable.

Two kinds of cells, both computed by the functions behind ``compare``
(:mod:`easyedit_replay.experiment`), so a cell equals the matching ``compare`` run:

- **one batch** (``--n 48,192,768``): for each ``n`` the first ``n`` records (nested
  prefixes of the same file), each algorithm and construction, all ``n`` edits in ONE
  batch from the original weights (:func:`~easyedit_replay.experiment.run_mode`, as
  ``compare --n N``); the unedited model's reference is evaluated on the same ``n``
  records, as ``compare`` does.
- **sequential** (``--sequential --batch-size B``): the first ``N = max(--n)`` records
  in batches of ``B`` applied one after another to the same model
  (:func:`~easyedit_replay.experiment.edit_batch`); after step ``k`` every edit made so
  far (``k * B``) is evaluated when ``k * B`` is one of ``--n``, at the last step, or
  at every step with ``--curve``. A step's cell also records the model fingerprint
  after the step, for AlphaEdit the rank of the sequential key cache, and
  ``sequential``: the batch's anchor and target norms relative to the unedited
  model's mean norms, the key drift of every batch made so far
  (:func:`~easyedit_replay.sequential.key_drift`) and, at the ``--attribution``
  steps, the restore-one-layer attribution of each earlier batch's efficacy.

Cells are JSON files under ``OUT/cells/`` written atomically as soon as they finish:

    cells/unedited/n00048.json                      the unedited model on records[:48]
    cells/batch/n00048/MEMIT__replay.json           one batch of 48
    cells/seq_b0096_n00768/AlphaEdit__spread/step003.json

A rerun skips every finished cell (a cell made with other settings - records,
hyperparameters, context templates, metric options - is an error naming the cell,
never reused) and loads the anchors from the anchor disk cache, so a run that stopped
(a time limit, Ctrl-C, a crash) resumes where it stopped. A sequential series resumes
by re-applying its finished steps (anchors from the disk cache, no evaluation) and
checks the model fingerprint against the one recorded; the first unfinished step
then runs as in an uninterrupted run.

:func:`write_scale_report` turns every cell found into ``report.md`` (tables with
95% bootstrap intervals, the paired differences ``mode - spread`` on the same edits
with a paired bootstrap interval - for a sequential series on all edits made so far,
at each step - a sequential series' retention and update-norm tables, missing cells
marked), PNG plots (metrics vs ``n``, paired differences vs ``n``, sequential metrics
and paired differences vs edits made) and one
``n<N>/results.json`` per size in ``compare``'s format (``tools/readme_tables.py``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .diagnostics import norm_modules, output_norms, restore_attribution
from .errors import ReplayError
from .experiment import (
    CompareConfig, PAPER_METRICS, bootstrap, edit_batch, mode_hparams, render_markdown, run_mode, score_rows,
    summarize_ci, unedited_block,
)
from .files import atomic_write_text
from .sequential import key_drift, reset_sequential_state, track_sequential

log = logging.getLogger(__name__)

# The metrics of the scale plots and tables: (key, label, higher is better).
SCALE_METRICS = (
    ("efficacy_exact", "eff. Acc", True),
    ("generalization_exact", "gen. Acc", True),
    ("locality_dkl", "DKL", False),
    ("locality_top1", "Top-1", True),
    ("fluency", "fluency", True),
    ("final_ratio", "final resid. ratio", False),
)
TABLE_METRICS = tuple(PAPER_METRICS) + (("fluency", "fluency"), ("final_ratio", "final resid. ratio"))
# hparams fields that do not change what a cell measures (paths, caching, chunking)
# and labels (the operating point's name and source: its values key the cell)
UNKEYED_HPARAMS = ("stats_dir", "anchor_cache", "anchor_batch_size", "device", "model_parallel",
                   "operating_point", "hparams_source")


@dataclass
class ScaleConfig(CompareConfig):
    """What ``scale`` runs and measures: :class:`CompareConfig` (modes, metric options;
    ``sequential`` with ``batch_size`` B makes a sequential series) plus ``sizes``.

    ``sizes``: the ``n`` of the one-batch cells (nested prefixes); for a sequential
    series their maximum is the number of edits ``N`` and the others are the points
    where it is evaluated. ``curve``: evaluate a sequential series after every batch.
    ``target_accuracy`` is off by default here: it reads every context template to
    the loss layer once more, the dearest diagnostic. ``attribution``: the steps of a
    sequential series after which each earlier batch's efficacy is re-scored with its
    edited weights set back one at a time (:func:`~easyedit_replay.diagnostics.restore_attribution`;
    ``2 + layers`` evaluations of each earlier batch per such step).
    """

    sizes: Sequence[int] = (48, 192, 768)
    curve: bool = False
    target_accuracy: bool = False
    attribution: Sequence[int] = ()

    def compare_config(self, batch_size=None, sequential=False) -> CompareConfig:
        """The :class:`CompareConfig` of one cell (one batch, or one step of a series)."""
        values = {f.name: getattr(self, f.name) for f in fields(CompareConfig)}
        return CompareConfig(**dict(values, modes=tuple(self.modes), batch_size=batch_size, sequential=sequential))

    def metric_settings(self) -> dict:
        return {"fluency": self.fluency, "fluency_tokens": self.fluency_tokens,
                "target_accuracy": self.target_accuracy, "n_boot": self.n_boot, "seed": self.seed}


# ----------------------------------------------------------------------------- cell files


def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def records_digest(records: Sequence[dict]) -> str:
    """Digest of the records' edit and evaluation fields (what a cell was measured on)."""
    return _digest([{k: r.get(k) for k in sorted(r)} for r in records])


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


def unedited_path(out: Path, n: int) -> Path:
    return out / "cells" / "unedited" / f"n{n:05d}.json"


def batch_path(out: Path, n: int, alg: str, mode: str) -> Path:
    return out / "cells" / "batch" / f"n{n:05d}" / f"{alg}__{mode}.json"


def series_dir(out: Path, b: int, total: int, alg: str, mode: str) -> Path:
    return out / "cells" / f"seq_b{b:04d}_n{total:05d}" / f"{alg}__{mode}"


def step_path(out: Path, b: int, total: int, alg: str, mode: str, step: int) -> Path:
    return series_dir(out, b, total, alg, mode) / f"step{step:03d}.json"


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
    if cell.get("settings_digest") != _digest(settings):
        old = cell.get("settings", {})
        fields = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        detail = []
        if "hparams" in fields:
            hp_old, hp_new = old.get("hparams") or {}, settings.get("hparams") or {}
            detail = [f"hparams.{k}" for k in sorted(set(hp_old) | set(hp_new)) if hp_old.get(k) != hp_new.get(k)]
        raise ReplayError(
            f"scale cell {path} was made with other settings ({', '.join(detail + [f for f in fields if f != 'hparams'])} "
            f"differ); delete it, or pass another --out, to recompute it")
    return cell


def write_cell(path: Path, cell: dict, settings: dict) -> None:
    """Write ``cell`` (plus its settings and their digest) atomically."""
    cell = dict(cell, settings=settings, settings_digest=_digest(settings),
                finished=datetime.datetime.now().isoformat(timespec="seconds"))
    atomic_write_text(path, json.dumps(cell, indent=1, default=str))


# ----------------------------------------------------------------------------- running


@dataclass
class _Context:
    model: object
    tok: object
    records: List[dict]
    by_alg: Dict[str, object]
    cfg: ScaleConfig
    out: Path
    templates: Dict[str, List[List[str]]]
    bar: object = None
    anchors: Optional[dict] = None
    baselines: Dict[int, list] = field(default_factory=dict)

    def baseline(self, n: int) -> list:
        """The unedited model's :func:`evaluate_records` on ``records[:n]`` (as ``compare --n
        n`` computes it), memoized for the latest ``n``; writes the unedited cell."""
        if n not in self.baselines:
            self.baselines.clear()
            recs = self.records[:n]
            cfg = self.cfg.compare_config()
            baseline, block = unedited_block(self.model, self.tok, recs, cfg)
            settings = {"records": records_digest(recs), "metrics": self.cfg.metric_settings()}
            if read_cell(unedited_path(self.out, n), settings) is None:
                write_cell(unedited_path(self.out, n), {"kind": "unedited", "n": n, **block}, settings)
            self.baselines[n] = baseline
        return self.baselines[n]


def _hp(ctx: _Context, alg: str, mode: str):
    return mode_hparams(ctx.by_alg[alg], alg, mode)


def _settings(ctx: _Context, alg: str, mode: str, n: int, **extra) -> dict:
    return {"records": records_digest(ctx.records[:n]), "hparams": hparams_settings(_hp(ctx, alg, mode)),
            "templates": ctx.templates[alg], "metrics": ctx.cfg.metric_settings(), **extra}


def _batch_cell(ctx: _Context, n: int, alg: str, mode: str) -> None:
    settings = _settings(ctx, alg, mode, n, kind="batch")
    path = batch_path(ctx.out, n, alg, mode)
    if read_cell(path, settings) is not None:
        return
    hp = _hp(ctx, alg, mode)
    records = ctx.records[:n]
    run = run_mode(ctx.model, ctx.tok, records, hp, ctx.cfg.compare_config(), ctx.baseline(n), ctx.templates[alg],
                   None, ctx.anchors)
    run["summary"] = summarize_ci(run["per_edit"], ctx.cfg.n_boot, ctx.cfg.seed)
    run["layers"] = list(hp.layers)
    write_cell(path, {"kind": "batch", "n": n, "alg": alg, "mode": mode, "operating_point": hp.operating_point,
                      "run": run}, settings)


def _steps(total: int, b: int) -> List[List[int]]:
    return [list(range(i, min(i + b, total))) for i in range(0, total, b)]


def alphaedit_cache_ranks(model, tol: float = 1e-6) -> Dict[str, int]:
    """``{weight: numerical rank}`` of AlphaEdit's sequential key cache ``sum K K^T`` of
    ``model`` (eigenvalues above ``tol`` times the largest); empty when it has none."""
    import torch

    from .algorithms.alphaedit import alphaedit_cache

    ranks = {}
    for name, cache in alphaedit_cache(model).items():
        ev = torch.linalg.eigvalsh(cache.double())
        ranks[name] = int((ev > tol * ev.abs().max().clamp(min=1e-300)).sum()) if ev.numel() else 0
    return ranks


def _sequential_series(ctx: _Context, alg: str, mode: str) -> None:
    from .algorithms import weight_names
    from .anchor_cache import model_fingerprint
    from .editor import weight_transaction
    from .tracing import resolve_parameter

    cfg, b = ctx.cfg, int(ctx.cfg.batch_size)
    total = max(cfg.sizes)
    steps = _steps(total, b)
    attribution = sorted({int(k) for k in cfg.attribution})
    settings = _settings(ctx, alg, mode, total, kind="sequential", batch_size=b, curve=cfg.curve,
                         sizes=sorted(cfg.sizes), **({"attribution": attribution} if attribution else {}))
    paths = [step_path(ctx.out, b, total, alg, mode, k + 1) for k in range(len(steps))]
    done = []
    for p in paths:
        cell = read_cell(p, settings)
        if cell is None:
            break
        done.append(cell)
    if len(done) == len(steps):
        return
    hp = _hp(ctx, alg, mode)
    params = {name: resolve_parameter(ctx.model, name) for name in weight_names(hp)}
    ccfg = cfg.compare_config(batch_size=b, sequential=True)
    reference = ctx.baseline(total)  # on the unedited weights, before the first batch is applied
    norms = output_norms(ctx.model, ctx.tok, ctx.records[:total], hp, norm_modules(hp))  # unedited, too
    rows: Dict[int, dict] = {}
    snapshots: Dict[int, Dict[str, object]] = {}  # the weights right after each step, for the attribution
    reset_sequential_state(ctx.model)
    track_sequential(ctx.model)  # record every batch's keys: the key drift reads them
    try:
        with weight_transaction(params, restore_always=True):
            for k, idx in enumerate(steps):
                if k < len(done):  # re-apply a finished step: anchors from the disk cache, no evaluation
                    edit_batch(ctx.model, ctx.tok, ctx.records, idx, hp, ccfg, ctx.templates[alg], ctx.anchors, k == 0,
                               k, diagnose=False)
                    rows.update({int(i): r for i, r in done[k]["batch_rows"].items()})
                    if model_fingerprint(ctx.model) != done[k]["fingerprint"]:
                        log.warning("%s/%s step %d re-applied to different weights than recorded (float rounding?); "
                                    "the steps after it continue from these weights", alg, mode, k + 1)
                else:
                    _sequential_step(ctx, alg, mode, hp, steps, k, rows, norms, reference, paths[k], settings,
                                     snapshots, params, attribution)
                if attribution:
                    snapshots[k + 1] = {n: p.detach().clone() for n, p in params.items()}
    finally:
        reset_sequential_state(ctx.model)


def _sequential_step(ctx: _Context, alg: str, mode: str, hp, steps, k: int, rows: Dict[int, dict],
                     norms: Dict[str, float], reference: list, path: Path, settings: dict, snapshots: dict,
                     params: dict, attribution: Sequence[int]) -> None:
    """Edit step ``k`` (0-based) of a sequential series into the model and write its cell:
    the batch's rows (added to ``rows``), analyses, timing, the model fingerprint,
    AlphaEdit's cache ranks, ``sequential`` (the batch's anchor and target norms relative
    to ``norms``, the key drift of every batch made so far, and at an ``attribution``
    step the restore-one-layer attribution, from ``snapshots`` of the weights after each
    earlier step) and, when the step is evaluated, every edit made so far against
    ``reference``."""
    from .anchor_cache import model_fingerprint

    cfg, idx = ctx.cfg, steps[k]
    ccfg = cfg.compare_config(batch_size=cfg.batch_size, sequential=True)
    step = edit_batch(ctx.model, ctx.tok, ctx.records, idx, hp, ccfg, ctx.templates[alg], ctx.anchors, k == 0, k,
                      norm_reference=norms)
    rows.update(step["rows"])
    made = idx[-1] + 1
    cell = {"kind": "sequential", "alg": alg, "mode": mode, "operating_point": hp.operating_point,
            "batch_size": int(cfg.batch_size), "total": max(cfg.sizes),
            "step": k + 1, "edits": made, "requests": idx, "batch_rows": {str(i): step["rows"][i] for i in idx},
            "analysis": step["analysis"], "accuracy": step["accuracy"], "seconds": step["seconds"],
            "timing": {"diagnostic_seconds": step["diagnostic_seconds"]},
            "fingerprint": model_fingerprint(ctx.model), "evaluated": False}
    if alg == "AlphaEdit":
        cell["alphaedit_cache_rank"] = alphaedit_cache_ranks(ctx.model)
    start = time.perf_counter()
    cell["sequential"] = {"norms": step["analysis"]["norms"],
                          "key_drift": {str(j + 1): d for j, d in enumerate(key_drift(ctx.model, ctx.tok))}}
    if k + 1 in attribution:
        earlier = {j: [ctx.records[i] for i in steps[j - 1]] for j in range(1, k + 1)}
        cell["sequential"]["attribution"] = restore_attribution(ctx.model, ctx.tok, earlier, snapshots, params)
    cell["timing"]["sequential_diagnostic_seconds"] = time.perf_counter() - start
    if cfg.curve or made in cfg.sizes or k == len(steps) - 1:
        scored = score_rows(ctx.model, ctx.tok, ctx.records[:made], reference[:made], ccfg, cell["timing"])
        per_edit = [{**rows[i], **scored[i]} for i in range(made)]
        cell.update(evaluated=True, evaluated_cases=[r.get("case_id") for r in ctx.records[:made]],
                    per_edit=per_edit, summary=summarize_ci(per_edit, cfg.n_boot, cfg.seed))
    write_cell(path, cell, settings)
    if ctx.bar is not None:
        ctx.bar.update(len(idx))


def planned_cells(cfg: ScaleConfig, algs: Sequence[str]) -> List[dict]:
    """The cells a ``scale`` invocation makes: ``{"kind", "n" | ("batch_size", "total",
    "step", "edits"), "alg", "mode"}``."""
    cells = []
    if cfg.sequential:
        total = max(cfg.sizes)
        for alg in algs:
            for mode in cfg.modes:
                for k, idx in enumerate(_steps(total, cfg.batch_size)):
                    cells.append({"kind": "sequential", "batch_size": int(cfg.batch_size), "total": total,
                                  "step": k + 1, "edits": idx[-1] + 1, "alg": alg, "mode": mode})
    else:
        for n in sorted(cfg.sizes):
            for alg in algs:
                for mode in cfg.modes:
                    cells.append({"kind": "batch", "n": n, "alg": alg, "mode": mode})
    return cells


def cell_path(out: Path, cell: dict) -> Path:
    if cell["kind"] == "batch":
        return batch_path(out, cell["n"], cell["alg"], cell["mode"])
    return step_path(out, cell["batch_size"], cell["total"], cell["alg"], cell["mode"], cell["step"])


def _cell_edits(cell: dict) -> int:
    return cell["n"] if cell["kind"] == "batch" else cell["edits"] - (cell["step"] - 1) * cell["batch_size"]


def run_scale(model, tok, records: List[dict], hparams_by_alg: Dict[str, object], cfg: ScaleConfig, out_dir,
              stats_dir=None, meta: Optional[dict] = None, report: bool = True) -> Optional[Path]:
    """Make every cell of ``cfg`` that ``out_dir`` does not hold yet (see the module
    docstring), then write the report. Returns ``out_dir/report.md``.

    Args:
        records: at least ``max(cfg.sizes)`` canonical records.
        hparams_by_alg: base algorithm name -> hyperparameters (any construction; the
            mode is set per cell).
        meta: what the report's title names (model, data), stored in ``scale.json``.
        report: write the report at the end (else None is returned; ``scale
            --report-only`` writes it later).

    Raises:
        ReplayError: bad sizes, or a finished cell made with other settings.
    """
    from tqdm.auto import tqdm

    from .editor import resolve_templates

    _check_sizes(cfg, len(records))
    sizes = cfg.sizes
    b = cfg.batch_size if cfg.sequential else None
    out = Path(out_dir)
    by_alg = {a: (hp.replace(stats_dir=stats_dir) if stats_dir else hp) for a, hp in hparams_by_alg.items()}
    templates = {a: resolve_templates(model, tok, hp) for a, hp in by_alg.items()}
    plan = planned_cells(cfg, list(by_alg))
    _update_plan(out, plan, meta)
    ctx = _Context(model, tok, records, by_alg, cfg, out, templates, anchors={} if cfg.share_anchors else None)
    finished = [c for c in plan if cell_path(out, c).exists()]
    total = sum(_cell_edits(c) for c in plan)
    ctx.bar = tqdm(total=total, initial=sum(_cell_edits(c) for c in finished), desc="scale", unit="edit",
                   disable=not cfg.progress, smoothing=0.0)
    try:
        if b is None:
            for n in sizes:
                ctx.anchors = {} if cfg.share_anchors else None  # anchor keys hold the batch: nothing carries over
                for alg in by_alg:
                    for mode in cfg.modes:
                        existed = batch_path(out, n, alg, mode).exists()
                        _batch_cell(ctx, n, alg, mode)  # a finished cell: only its settings are checked
                        if not existed:
                            ctx.bar.update(n)
        else:
            for alg in by_alg:
                for mode in cfg.modes:
                    _sequential_series(ctx, alg, mode)
    finally:
        ctx.bar.close()
    return write_scale_report(out, cfg.n_boot, cfg.seed) if report else None


def _check_sizes(cfg: ScaleConfig, n_records: Optional[int]) -> None:
    """Sort ``cfg.sizes`` in place and check them and the batch size (``n_records`` None:
    no upper bound on the sizes).

    Raises:
        ReplayError: a size outside 1..n_records, a sequential run without a batch size in
            1..max(sizes), a batch size for a one-batch run, or an attribution step
            outside 2..(steps of the series).
    """
    sizes = sorted({int(n) for n in cfg.sizes})
    if not sizes or sizes[0] < 1 or (n_records is not None and sizes[-1] > n_records):
        bound = f"in 1..{n_records} (the records loaded)" if n_records is not None else "positive"
        raise ReplayError(f"--n {','.join(map(str, cfg.sizes))}: sizes must be {bound}")
    b = cfg.batch_size if cfg.sequential else None
    if cfg.sequential and (b is None or not 1 <= int(b) <= sizes[-1]):
        raise ReplayError(f"--batch-size {b}: a sequential run needs a batch size in 1..{sizes[-1]} (the largest --n)")
    if not cfg.sequential and cfg.batch_size is not None:
        raise ReplayError(f"--batch-size {cfg.batch_size}: one-batch cells edit all n at once; batch sizes are for --sequential")
    if cfg.attribution:
        n_steps = len(_steps(sizes[-1], int(b))) if cfg.sequential else 0
        if not cfg.sequential or any(not 2 <= int(k) <= n_steps for k in cfg.attribution):
            raise ReplayError(f"--attribution {','.join(map(str, cfg.attribution))}: steps of a --sequential series "
                              f"that have an earlier batch, in 2..{n_steps}")
    cfg.sizes = sizes


def record_plan(out_dir, cfg: ScaleConfig, algs: Sequence[str], meta: Optional[dict] = None) -> Path:
    """Add the cells of ``cfg`` x ``algs`` to ``out_dir/scale.json`` without making any
    (``scale --plan-only``), so that the report lists the unfinished ones as missing;
    then rewrite the report. Returns ``out_dir/report.md``.

    Raises:
        ReplayError: bad sizes or batch size (the checks of :func:`run_scale`).
    """
    _check_sizes(cfg, None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _update_plan(out, planned_cells(cfg, list(algs)), meta)
    return write_scale_report(out, cfg.n_boot, cfg.seed)


def _update_plan(out: Path, plan: List[dict], meta: Optional[dict]) -> None:
    path = out / "scale.json"
    data = json.loads(path.read_text()) if path.exists() else {"planned": [], "meta": {}}
    known = {json.dumps(c, sort_keys=True) for c in data["planned"]}
    data["planned"] += [c for c in plan if json.dumps(c, sort_keys=True) not in known]
    data["meta"].update(meta or {})
    atomic_write_text(path, json.dumps(data, indent=1))


# ----------------------------------------------------------------------------- report


def paired_difference(rows: Sequence[dict], reference: Sequence[dict], key: str, n_boot: int = 1000, seed: int = 0):
    """``(mean, lo, hi)`` of ``rows[i][key] - reference[i][key]`` over the edits where
    both are present: the paired difference on the same edits, with its 95% percentile
    bootstrap interval (edits resampled with both values together)."""
    diffs = [a.get(key) - r.get(key) for a, r in zip(rows, reference)
             if a.get(key) is not None and r.get(key) is not None
             and not (isinstance(a.get(key), float) and math.isnan(a.get(key)))]
    return bootstrap(diffs, n_boot, seed)


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
        found["batch"].setdefault(cell["n"], {})[f"{cell['alg']}/{cell['mode']}"] = cell
    for path in sorted(out.glob("seq_b*/*/step*.json")):
        cell = json.loads(path.read_text())
        series = found["sequential"].setdefault((cell["batch_size"], cell["total"]), {})
        series.setdefault(f"{cell['alg']}/{cell['mode']}", []).append(cell)
    for series in found["sequential"].values():
        for steps in series.values():
            steps.sort(key=lambda c: c["step"])
    return found


def results_for_n(found: dict, n: int, meta: dict) -> dict:
    """A ``compare``-format results dict of the one-batch cells of size ``n``."""
    runs = {key: cell["run"] for key, cell in sorted(found["batch"].get(n, {}).items(), key=_order)}
    un = found["unedited"].get(n)
    return {"n": n, "data": meta.get("data"), "model": meta.get("model"),
            "unedited": {"per_edit": un["per_edit"], "summary": un["summary"]} if un else None, "runs": runs}


def _order(item):
    key = item[0] if isinstance(item, tuple) else item
    alg, mode = key.split("/")
    algs, modes = ["MEMIT", "PMET", "EMMET", "AlphaEdit"], ["spread", "replay", "replay_remaining", "blue",
                                                            "onelayer", "nodiv"]
    return (algs.index(alg) if alg in algs else len(algs), alg, modes.index(mode) if mode in modes else len(modes), mode)


def _fmt(stat, digits=2, signed=False) -> str:
    mean, lo, hi = stat
    if mean is None:
        return "-"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def _summary(cell_run: dict, key: str):
    s = cell_run["summary"].get(key)
    return tuple(s) if s is not None else (None, None, None)


def batch_table(found: dict, n: int, metrics=TABLE_METRICS) -> List[List[str]]:
    """Rows (header first) of the size-``n`` table: mean [95% CI] per metric, one row per
    algorithm and mode, and the cell's seconds: the edit (anchors the process had to
    optimize for it included), scoring and fluency (``-`` where a cell has no timing)."""
    header = ["algorithm", "mode"] + [h for _, h in metrics] + ["edit s", "scoring s", "fluency s"]
    rows = [header]
    un = found["unedited"].get(n)
    if un:
        rows.append(["-", "unedited"] + [_fmt(tuple(un["summary"][k])) if k in un["summary"] else "-"
                                         for k, _ in metrics] + ["-", "-", "-"])
    for key, cell in sorted(found["batch"].get(n, {}).items(), key=_order):
        run = cell["run"]
        timing = run.get("timing") or {}
        rows.append(key.split("/") + [_fmt(_summary(run, k)) for k, _ in metrics] + [f"{run['seconds']:.0f}"]
                    + [f"{timing[k]:.0f}" if k in timing else "-" for k in ("eval_seconds", "fluency_seconds")])
    return rows


def against_spread(per_edit_by_key: Dict[str, list]):
    """``(alg, mode, rows, reference)`` for every non-spread ``"ALG/mode"`` of
    ``per_edit_by_key`` whose algorithm also has a spread entry, in table order: the
    per-edit rows of the mode and of spread on the same edits, for
    :func:`paired_difference`. ``per_edit_by_key`` maps ``"ALG/mode"`` to the per-edit
    rows of one batch of ``n`` (or of one sequential step, all edits made so far)."""
    for key, rows in sorted(per_edit_by_key.items(), key=_order):
        alg, mode = key.split("/")
        ref = per_edit_by_key.get(f"{alg}/spread")
        if mode != "spread" and ref is not None:
            yield alg, mode, rows, ref


def _batch_per_edit(found: dict, n: int) -> Dict[str, list]:
    return {key: cell["run"]["per_edit"] for key, cell in found["batch"].get(n, {}).items()}


def sequential_steps(series: Dict[str, List[dict]]) -> Dict[int, Dict[str, dict]]:
    """``{edits made: {"ALG/mode": step cell}}`` of the evaluated steps of one sequential
    series (``collect_cells(...)["sequential"][(b, total)]``), in order of edits made; the
    modes of one algorithm are paired at the steps both have evaluated."""
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


def _marked(stat) -> str:
    clear = stat[0] is not None and (stat[1] > 0 or stat[2] < 0)
    return _fmt(stat, signed=True) + ("*" if clear else "")


def paired_table(found: dict, n: int, n_boot: int, seed: int, metrics=TABLE_METRICS) -> List[List[str]]:
    """Rows (header first): ``mode - spread`` on the same edits, mean [95% paired
    bootstrap interval], one row per algorithm and non-spread mode; a ``*`` marks an
    interval that excludes 0."""
    rows = [["algorithm", "mode - spread"] + [h for _, h in metrics]]
    for alg, mode, per_edit, ref in against_spread(_batch_per_edit(found, n)):
        rows.append([alg, mode] + [_marked(paired_difference(per_edit, ref, k, n_boot, seed)) for k, _ in metrics])
    return rows


def sequential_paired_table(series: Dict[str, List[dict]], n_boot: int, seed: int,
                            metrics=TABLE_METRICS) -> List[List[str]]:
    """Rows (header first) of one sequential series: ``mode - spread`` on all edits made
    so far, at every step both have evaluated, mean [95% paired bootstrap interval]
    (``*``: excludes 0)."""
    rows = [["algorithm", "mode - spread", "edits made"] + [h for _, h in metrics]]
    by_step = sequential_per_edit(series)
    for alg, mode in dict.fromkeys((a, m) for made in by_step.values() for a, m, _, _ in against_spread(made)):
        for made, per_edit_by_key in by_step.items():
            if f"{alg}/{mode}" in per_edit_by_key and f"{alg}/spread" in per_edit_by_key:
                per_edit, ref = per_edit_by_key[f"{alg}/{mode}"], per_edit_by_key[f"{alg}/spread"]
                rows.append([alg, mode, str(made)]
                            + [_marked(paired_difference(per_edit, ref, k, n_boot, seed)) for k, _ in metrics])
    return rows


def clear_differences(found: dict, n_boot: int, seed: int) -> List[str]:
    """Plain-words lines: every paired difference ``mode - spread`` (SCALE_METRICS) whose
    95% interval excludes 0, per size of one batch and per evaluated step of each
    sequential series, with its direction (better / worse)."""
    groups = [(f"n = {n}", _batch_per_edit(found, n)) for n in sorted(found["batch"])]
    for (b, total), series in sorted(found["sequential"].items()):
        groups += [(f"sequential in batches of {b}, {made} edits made", per_edit_by_key)
                   for made, per_edit_by_key in sequential_per_edit(series).items()]
    lines = []
    for where, per_edit_by_key in groups:
        for alg, mode, per_edit, ref in against_spread(per_edit_by_key):
            for k, label, higher in SCALE_METRICS:
                mean, lo, hi = paired_difference(per_edit, ref, k, n_boot, seed)
                if mean is None or (lo <= 0 <= hi):
                    continue
                better = (mean > 0) == higher
                lines.append(f"- {where}, {alg}: {mode} - spread, {label} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                             f"({'better' if better else 'worse'})")
    return lines


def sequential_table(steps_by_key: Dict[str, List[dict]], metrics=TABLE_METRICS) -> List[List[str]]:
    header = ["algorithm", "mode", "edits made"] + [h for _, h in metrics] + ["edit s (step)"]
    rows = [header]
    for key, steps in sorted(steps_by_key.items(), key=_order):
        for cell in steps:
            if not cell.get("evaluated"):
                continue
            rows.append(key.split("/") + [str(cell["edits"])] + [_fmt(_summary(cell, k)) for k, _ in metrics]
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
    for k, steps in sorted(evaluated.items(), key=_order):
        for cell in steps:
            b = cell["batch_size"]
            means = []
            for j in range(n_batches):
                values = [r[key] for r in cell["per_edit"][j * b:(j + 1) * b] if r.get(key) is not None]
                means.append(f"{sum(values) / len(values):.2f}" if values and j < cell["step"] else "")
            rows.append(k.split("/") + [str(cell["edits"])] + means)
    return rows


def _layer_of(name: str) -> str:
    """``"model.layers.4.mlp.down_proj.weight"`` -> ``"layer 4"`` (the name itself without a layer index)."""
    index = next((part for part in name.split(".") if part.isdigit()), None)
    return f"layer {index}" if index is not None else name


def _per_weight_table(steps_by_key: Dict[str, List[dict]], values, header, fmt: str) -> List[List[str]]:
    """Rows (header first) of one sequential series, one per step: ``values(cell)`` (``{module
    or weight name: number}``) in one column per name, headed ``header(name)`` (``"-"``
    where a step has no value)."""
    names = list(dict.fromkeys(n for steps in steps_by_key.values() for c in steps for n in values(c)))
    rows = [["algorithm", "mode", "step"] + [header(n) for n in names]]
    for k, steps in sorted(steps_by_key.items(), key=_order):
        for cell in steps:
            found = values(cell)
            rows.append(k.split("/") + [str(cell["step"])] + [fmt.format(found[n]) if n in found else "-" for n in names])
    return rows


def update_norm_table(steps_by_key: Dict[str, List[dict]]) -> List[List[str]]:
    """Rows (header first) of one sequential series: the Frobenius norm of each step's
    weight update per edited weight (``analysis["update_norm"]``; a column is named by
    the weight's layer index), one row per step."""
    return _per_weight_table(steps_by_key, lambda c: (c.get("analysis") or {}).get("update_norm", {}),
                             lambda n: f"|dW| {_layer_of(n)}", "{:.1f}")


def key_drift_table(steps_by_key: Dict[str, List[dict]], batch: int = 1) -> List[List[str]]:
    """Rows (header first): after each step, how far the keys of batch ``batch``'s edits
    have moved since their edit, mean ``|k_now - k_edit| / |k_edit|`` per edited weight
    (``cell["sequential"]["key_drift"]``)."""
    def values(cell):
        drift = (cell.get("sequential") or {}).get("key_drift", {}).get(str(batch), {})
        return {name: stats["relative_change"] for name, stats in drift.items()}

    return _per_weight_table(steps_by_key, values, lambda n: f"key drift {_layer_of(n)}", "{:.4f}")


def target_norm_table(steps_by_key: Dict[str, List[dict]]) -> List[List[str]]:
    """Rows (header first): each step's anchor ``|delta|`` and the norm of its target at
    every edited layer, means over the batch relative to the unedited model's mean norm
    of that module (``cell["sequential"]["norms"]``)."""
    def values(cell):
        norms = (cell.get("sequential") or {}).get("norms", {})
        out = {("delta", m): v["delta"] for m, v in norms.get("anchor", {}).items()}
        out.update({("target", m): v["norm"] for m, v in norms.get("targets", {}).items()})
        return out

    return _per_weight_table(steps_by_key, values,
                             lambda n: f"{'|delta|' if n[0] == 'delta' else '|t|'} {_layer_of(n[1])}", "{:.2f}")


def attribution_table(steps_by_key: Dict[str, List[dict]], key: str = "efficacy_exact") -> List[List[str]]:
    """Rows (header first) of the restore-one-layer attribution (``--attribution``): for
    each attributed step and earlier batch, ``key`` of that batch's edits now, with every
    edited weight set back to its value right after the batch, and with each one alone
    set back."""
    names = list(dict.fromkeys(n for steps in steps_by_key.values() for c in steps
                               for entry in (c.get("sequential") or {}).get("attribution", {}).values()
                               for n in entry["restored"]))
    rows = [["algorithm", "mode", "step", "batch", "now", "all set back"] + [f"{_layer_of(n)} set back" for n in names]]
    for k, steps in sorted(steps_by_key.items(), key=_order):
        for cell in steps:
            for j, entry in (cell.get("sequential") or {}).get("attribution", {}).items():
                restored = entry["restored"]
                rows.append(k.split("/") + [str(cell["step"]), j, f"{entry['now'][key]:.2f}",
                                            f"{entry['after_batch'][key]:.2f}"]
                            + [f"{restored[n][key]:.2f}" if n in restored else "-" for n in names])
    return rows


def _finite(stat) -> bool:
    return stat[0] is not None and all(math.isfinite(v) for v in stat)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MODE_STYLE = {"spread": ("o", "--"), "replay": ("s", "-"), "replay_remaining": ("v", "-"), "blue": ("^", ":"),
              "onelayer": ("D", ":"), "nodiv": ("x", ":")}


def plot_bands(lines: List[tuple], path: Path, title: str, xlabel: str, log_x: bool = True,
               differences: bool = False) -> Optional[Path]:
    """One panel row per algorithm, one column per :data:`SCALE_METRICS` metric, one
    line per ``(alg, label, mode, points)`` in ``lines`` with ``points = {metric: [(x,
    (mean, lo, hi))]}``, its interval as a band (an error bar for a line of one point;
    non-finite points left out), each mode in one color throughout.
    ``differences``: a zero line, and titles say which sign is better."""
    algs = list(dict.fromkeys(alg for alg, *_ in lines))
    if not algs:
        return None
    colors = {mode: f"C{i % 10}" for i, mode in enumerate(dict.fromkeys(mode for _, _, mode, _ in lines))}
    plt = _plt()
    fig, axes = plt.subplots(len(algs), len(SCALE_METRICS), figsize=(3.1 * len(SCALE_METRICS), 2.6 * len(algs)),
                             squeeze=False)
    fig.suptitle(title, fontsize=10)
    for r, alg in enumerate(algs):
        for line_alg, label, mode, points in lines:
            if line_alg != alg:
                continue
            marker, style = MODE_STYLE.get(mode, (".", "-"))
            for c, (m, _, _) in enumerate(SCALE_METRICS):
                pts = [(x, st) for x, st in points.get(m, []) if _finite(st)]
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
        for c, (_, label, higher) in enumerate(SCALE_METRICS):
            ax = axes[r][c]
            if log_x and ax.lines:
                ax.set_xscale("log", base=2)
            if differences:
                ax.axhline(0.0, color="grey", linewidth=0.7)
                ax.set_title(f"{alg}: {label} ({'+' if higher else '-'} = better)", fontsize=8)
            else:
                ax.set_title(f"{alg}: {label}" + ("" if higher else " (lower better)"), fontsize=8)
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
    keys = sorted({k for cells in found["batch"].values() for k in cells}, key=_order)
    lines = []
    for key in keys:
        alg, mode = key.split("/")
        ns = sorted(n for n, cells in found["batch"].items() if key in cells)
        lines.append((alg, mode, mode, {m: [(n, _summary(found["batch"][n][key]["run"], m)) for n in ns]
                                        for m, _, _ in SCALE_METRICS}))
    return plot_bands(lines, path, "one batch of n edits: mean over edits, 95% bootstrap band", "edits in the batch")


def _paired_lines(groups: Dict[int, Dict[str, list]], suffix: str, n_boot: int, seed: int) -> List[tuple]:
    """:func:`plot_bands` lines of ``mode - spread`` against ``x`` for ``groups = {x:
    {"ALG/mode": per-edit rows}}``, one line per algorithm and non-spread mode."""
    points: Dict[str, dict] = {}
    for x, per_edit_by_key in groups.items():
        for alg, mode, per_edit, ref in against_spread(per_edit_by_key):
            line = points.setdefault(f"{alg}/{mode}", {m: [] for m, _, _ in SCALE_METRICS})
            for m, _, _ in SCALE_METRICS:
                line[m].append((x, paired_difference(per_edit, ref, m, n_boot, seed)))
    return [(key.split("/")[0], key.split("/")[1] + suffix, key.split("/")[1], pts)
            for key, pts in sorted(points.items(), key=_order)]


def plot_paired(found: dict, path: Path, n_boot: int, seed: int) -> Optional[Path]:
    """``mode - spread`` on the same edits vs ``n``, 95% paired bootstrap bands."""
    lines = _paired_lines({n: _batch_per_edit(found, n) for n in sorted(found["batch"])}, "", n_boot, seed)
    return plot_bands(lines, path, "paired difference mode - spread on the same edits, 95% paired bootstrap band",
                      "edits in the batch", differences=True)


def plot_sequential_scale(found: dict, path: Path) -> Optional[Path]:
    """Sequential series: the metrics of all edits made so far vs the number made."""
    lines = []
    for (b, total), series in sorted(found["sequential"].items()):
        for key, steps in sorted(series.items(), key=_order):
            steps = [c for c in steps if c.get("evaluated")]
            if steps:
                alg, mode = key.split("/")
                lines.append((alg, f"{mode} (batches of {b})", mode,
                              {m: [(c["edits"], _summary(c, m)) for c in steps] for m, _, _ in SCALE_METRICS}))
    return plot_bands(lines, path, "sequential editing: metrics of all edits made so far, 95% bootstrap band",
                      "edits made", log_x=False)


def plot_sequential_paired(found: dict, path: Path, n_boot: int, seed: int) -> Optional[Path]:
    """Sequential series: ``mode - spread`` on all edits made so far vs the number made,
    95% paired bootstrap bands."""
    lines = []
    for (b, total), series in sorted(found["sequential"].items()):
        lines += _paired_lines(sequential_per_edit(series), f" (batches of {b})", n_boot, seed)
    return plot_bands(lines, path, "sequential editing: paired difference mode - spread on all edits made so far, "
                      "95% paired bootstrap band", "edits made", log_x=False, differences=True)


def missing_cells(out_dir, found: Optional[dict] = None) -> List[dict]:
    """Planned cells (``scale.json``) with no finished cell file."""
    out = Path(out_dir)
    path = out / "scale.json"
    if not path.exists():
        return []
    plan = json.loads(path.read_text())["planned"]
    return [c for c in plan if not cell_path(out, c).exists()]


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
    for n in sorted(found["batch"]):
        lines += [f"## One batch of {n} edits", "", render_markdown(batch_table(found, n)), "",
                  f"Paired differences, {n} edits:", "", render_markdown(paired_table(found, n, n_boot, seed)), ""]
    clear = clear_differences(found, n_boot, seed)
    if found["batch"]:
        lines += ["## Paired differences whose 95% interval excludes 0", ""] + (clear or ["- none"]) + [""]
    for (b, total), series in sorted(found["sequential"].items()):
        lines += [f"## Sequential: {total} edits in batches of {b}", "",
                  render_markdown(sequential_table(series)), "",
                  f"Paired differences, sequential in batches of {b} (all edits made so far):", "",
                  render_markdown(sequential_paired_table(series, n_boot, seed)), "",
                  "Retention: efficacy Acc of each batch's edits after every step (forgetting of the earlier "
                  "batches):", "", render_markdown(retention_table(series)), "",
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
        ranks = [(key, c["step"], c["alphaedit_cache_rank"]) for key, steps in sorted(series.items(), key=_order)
                 for c in steps if c.get("alphaedit_cache_rank")]
        if ranks:
            lines += ["AlphaEdit's key cache after each step (rank of sum K K^T per weight, min..max): "
                      + "; ".join(f"{k} step {s}: {min(r.values())}..{max(r.values())}" for k, s, r in ranks), ""]
    missing = missing_cells(out, found)
    if missing:
        lines += ["## Missing cells (planned, not finished yet)", ""]
        lines += [f"- {_describe(c)}" for c in missing] + [""]
    for name, p in plots.items():
        if p:
            lines += [f"![{name}]({p.name})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _describe(cell: dict) -> str:
    if cell["kind"] == "batch":
        return f"one batch, n = {cell['n']}, {cell['alg']}/{cell['mode']}"
    return (f"sequential {cell['total']} in batches of {cell['batch_size']}, step {cell['step']} "
            f"({cell['edits']} edits made), {cell['alg']}/{cell['mode']}")
