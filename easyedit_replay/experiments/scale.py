"""``easyedit-replay scale``: the comparison at growing numbers of edits, cell by cell,
resumable.

Two kinds of cells, both computed by the functions behind ``compare``
(:mod:`easyedit_replay.experiments.runner`), so a cell equals the matching ``compare`` run:

- **one batch** (``--n 48,192,768``): for each ``n`` the first ``n`` records (nested
  prefixes of the same file), each algorithm and construction, all ``n`` edits in ONE
  batch from the original weights (:func:`~easyedit_replay.experiments.runner.run_mode`,
  as ``compare --n N``); the unedited model's reference is evaluated on the same ``n``
  records, as ``compare`` does.
- **sequential** (``--sequential --batch-size B``): the first ``N = max(--n)`` records
  in batches of ``B`` applied one after another to the same model
  (:func:`~easyedit_replay.experiments.runner.edit_in_batches`, a cell written from its
  per-step callback); after step ``k`` every edit made so far (``k * B``) is evaluated
  when ``k * B`` is one of ``--n``, at the last step, or at every step with ``--curve``.
  A step's cell also records the model fingerprint after the step, for AlphaEdit the
  rank of the sequential key cache, and ``sequential``: the batch's anchor and target
  norms relative to the unedited model's mean norms, the key drift of every batch made
  so far (:func:`~easyedit_replay.sequential.key_drift`) and, at the ``--attribution``
  steps, the restore-one-layer attribution of each earlier batch's efficacy.

Cells are JSON files under ``OUT/cells/`` (:mod:`~easyedit_replay.experiments.cells`)
written atomically as soon as they finish. A rerun skips every finished cell (a cell
made with other settings - records, hyperparameters, context templates, metric
options - is an error naming the cell, never reused) and loads the anchors from the
anchor disk cache, so a run that stopped (a time limit, Ctrl-C, a crash) resumes where
it stopped. A sequential series resumes by re-applying its finished steps (anchors
from the disk cache, no evaluation) and checks the model fingerprint against the one
recorded; the first unfinished step then runs as in an uninterrupted run. On another
machine the re-applied weights can differ from the recorded ones by float rounding:
each step's anchors are then keyed under the recorded fingerprint
(:func:`~easyedit_replay.anchors.store.recorded_as`), so the banked anchors still serve,
and each re-applied update is checked against its cell's update norms
(:func:`redo_drift`; beyond :data:`REDO_TOLERANCE` a warning says the code or the
inputs changed).

:func:`~easyedit_replay.experiments.report.write_scale_report` turns every cell found
into ``report.md``, the plots and one ``n<N>/results.json`` per size in ``compare``'s format.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..diagnostics import norm_modules, output_norms, restore_attribution
from ..errors import ReplayError
from ..evaluate import Evaluation
from ..sequential import key_drift, reset_sequential_state, track_sequential
from .cells import (
    batch_path, cell_edits, cell_path, check_out_point, hparams_settings, plan_points, planned_cells, read_cell,
    records_digest, step_path, steps_of, unedited_path, update_plan, write_cell,
)
from .metrics import RunKey
from .runner import (
    CompareConfig, edit_in_batches, mode_hparams, run_mode, score_rows, shared_anchors, unedited_block,
)
from .statistics import summarize_ci

log = logging.getLogger("easyedit_replay.scale")


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
        """The settings a cell's metrics depend on (``fluency``, ``fluency_tokens``,
        ``target_accuracy``, ``n_boot``, ``seed``): part of each cell's settings, so
        :func:`~easyedit_replay.experiments.cells.read_cell` refuses a cell computed under
        other ones."""
        return {"fluency": self.fluency, "fluency_tokens": self.fluency_tokens,
                "target_accuracy": self.target_accuracy, "n_boot": self.n_boot, "seed": self.seed}


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
    baselines: Dict[int, Evaluation] = field(default_factory=dict)

    def baseline(self, n: int) -> Evaluation:
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

    def hparams(self, run: RunKey):
        """``(hp, construction)`` of ``run`` (:func:`~easyedit_replay.experiments.runner.mode_hparams`)."""
        return mode_hparams(self.by_alg[run.alg], run.alg, run.mode)

    def settings(self, run: RunKey, n: int, **extra) -> dict:
        return {"records": records_digest(self.records[:n]), "hparams": hparams_settings(self.hparams(run)[0]),
                "templates": self.templates[run.alg], "metrics": self.cfg.metric_settings(), **extra}


def _batch_cell(ctx: _Context, n: int, run: RunKey) -> None:
    settings = ctx.settings(run, n, kind="batch")
    path = batch_path(ctx.out, n, run.alg, run.mode)
    if read_cell(path, settings) is not None:
        return
    hp, construction = ctx.hparams(run)
    records = ctx.records[:n]
    result = run_mode(ctx.model, ctx.tok, records, hp, construction, ctx.cfg.compare_config(), ctx.baseline(n),
                      ctx.templates[run.alg], None)
    result["summary"] = summarize_ci(result["per_edit"], ctx.cfg.n_boot, ctx.cfg.seed)
    result["layers"] = list(hp.layers)
    write_cell(path, {"kind": "batch", "n": n, "alg": run.alg, "mode": run.mode,
                      "operating_point": hp.operating_point, "run": result}, settings)


def alphaedit_cache_ranks(model, tol: float = 1e-6) -> Dict[str, int]:
    """``{weight: numerical rank}`` of AlphaEdit's sequential key cache ``sum K K^T`` of
    ``model`` (eigenvalues above ``tol`` times the largest); empty when it has none."""
    import torch

    from ..algorithms.alphaedit import alphaedit_cache

    ranks = {}
    for name, cache in alphaedit_cache(model).items():
        ev = torch.linalg.eigvalsh(cache.double())
        ranks[name] = int((ev > tol * ev.abs().max().clamp(min=1e-300)).sum()) if ev.numel() else 0
    return ranks


REDO_TOLERANCE = 1e-3  # largest relative |dW| difference a re-applied step may show against its cell


def redo_drift(update_norm: Dict[str, float], recorded: Optional[Dict[str, float]]) -> Optional[float]:
    """Largest relative difference between a re-applied step's per-weight update norms
    ``update_norm`` (``{weight name: |dW|}``, :func:`~easyedit_replay.experiments.runner.edit_batch`)
    and the ones its cell recorded (``analysis["update_norm"]``); None when the cell has
    none or names other weights. Float rounding gives about 1e-6; a change to the code or
    the inputs gives far more than :data:`REDO_TOLERANCE`. What it cannot see: a change
    that keeps every weight's update norm (one number per weight), and a change to the
    anchor optimization alone, since a re-applied step is served the banked anchors."""
    if not recorded or set(recorded) != set(update_norm):
        return None
    return max(abs(float(update_norm[w]) - float(recorded[w])) / max(abs(float(recorded[w])), 1e-12)
               for w in recorded)


@dataclass
class _Series:
    """One sequential series being made: what its per-step callbacks share."""

    ctx: _Context
    run: RunKey
    hp: object
    steps: List[List[int]]
    settings: dict
    paths: List[Path]
    done: List[dict]
    params: dict
    attribution: List[int]
    reference: Optional[Evaluation] = None
    norms: Dict[str, float] = None
    recorded: List[Optional[str]] = field(default_factory=list)  # edit_in_batches' ``recorded``, per step
    rows: Dict[int, dict] = field(default_factory=dict)
    snapshots: Dict[int, Dict[str, object]] = field(default_factory=dict)  # weights right after each step

    def redone(self, k: int, idx, step: dict) -> None:
        """A finished step re-applied: its rows back, its fingerprint and its update norms
        checked against the step's cell (:func:`redo_drift`). Where the fingerprint differs
        and the update does not match (or the cell has no norms), the later steps' anchors
        are no longer keyed under the recorded fingerprints (``recorded`` cleared from
        step ``k + 1`` on): they are optimized on the weights as they are."""
        from ..anchors.store import model_fingerprint

        self.rows.update({int(i): r for i, r in self.done[k]["batch_rows"].items()})
        if model_fingerprint(self.ctx.model) != self.done[k]["fingerprint"]:
            drift = redo_drift(step["update_norm"], (self.done[k].get("analysis") or {}).get("update_norm"))
            if drift is None or drift > REDO_TOLERANCE:
                self.recorded[k + 1:] = [None] * len(self.recorded[k + 1:])
                log.warning("%s step %d re-applied with an update that differs from the recorded one (largest "
                            "relative |dW| difference %s, tolerance %g): the code or the inputs changed since the "
                            "step was made; the steps after it continue from these weights and optimize their "
                            "own anchors", self.run.text, k + 1, "unknown" if drift is None else f"{drift:.2e}",
                            REDO_TOLERANCE)
            else:
                log.info("%s step %d re-applied to weights that differ from the recorded ones by float rounding "
                         "(largest relative |dW| difference %.2e); anchors are keyed under the recorded weights",
                         self.run.text, k + 1, drift)
        self._snapshot(k)

    def made(self, k: int, idx, step: dict) -> None:
        """Step ``k`` (0-based) made: write its cell (:func:`_step_cell`)."""
        _step_cell(self, k, idx, step)
        self._snapshot(k)

    def _snapshot(self, k: int) -> None:
        if self.attribution:
            self.snapshots[k + 1] = {n: p.detach().clone() for n, p in self.params.items()}


def _sequential_series(ctx: _Context, run: RunKey) -> None:
    from ..algorithms import weight_names
    from ..tracing import resolve_parameter

    cfg, b = ctx.cfg, int(ctx.cfg.batch_size)
    total = max(cfg.sizes)
    steps = steps_of(total, b)
    attribution = sorted({int(k) for k in cfg.attribution})
    settings = ctx.settings(run, total, kind="sequential", batch_size=b, curve=cfg.curve,
                            sizes=sorted(cfg.sizes), **({"attribution": attribution} if attribution else {}))
    paths = [step_path(ctx.out, b, total, run.alg, run.mode, k + 1) for k in range(len(steps))]
    done = []
    for p in paths:
        cell = read_cell(p, settings)
        if cell is None:
            break
        done.append(cell)
    if len(done) == len(steps):
        return
    hp, construction = ctx.hparams(run)
    params = {name: resolve_parameter(ctx.model, name) for name in weight_names(hp)}
    series = _Series(ctx, run, hp, steps, settings, paths, done, params, attribution,
                     recorded=[None] + [cell["fingerprint"] for cell in done])
    ccfg = cfg.compare_config(batch_size=b, sequential=True)
    series.reference = ctx.baseline(total)  # on the unedited weights, before the first batch is applied
    series.norms = output_norms(ctx.model, ctx.tok, ctx.records[:total], hp, norm_modules(hp))  # unedited, too
    reset_sequential_state(ctx.model)
    track_sequential(ctx.model)  # record every batch's keys: the key drift reads them
    try:
        edit_in_batches(ctx.model, ctx.tok, ctx.records, steps, hp, construction, ccfg, ctx.templates[run.alg],
                        series.made, params=params, redo=len(done), on_redo=series.redone, norm_reference=series.norms,
                        recorded=series.recorded)
    finally:
        reset_sequential_state(ctx.model)


def _step_cell(series: _Series, k: int, idx, step: dict) -> None:
    """Write the cell of step ``k`` (0-based) of a sequential series, just made: the
    batch's rows (added to ``series.rows``), analyses, timing, the model fingerprint,
    AlphaEdit's cache ranks, ``sequential`` (the batch's anchor and target norms relative
    to ``series.norms``, the key drift of every batch made so far, and at an attribution
    step the restore-one-layer attribution, from the snapshots of the weights after each
    earlier step) and, when the step is evaluated, every edit made so far against
    ``series.reference``."""
    from ..anchors.store import model_fingerprint

    ctx, run, cfg = series.ctx, series.run, series.ctx.cfg
    ccfg = cfg.compare_config(batch_size=cfg.batch_size, sequential=True)
    series.rows.update(step["rows"])
    made = idx[-1] + 1
    cell = {"kind": "sequential", "alg": run.alg, "mode": run.mode, "operating_point": series.hp.operating_point,
            "batch_size": int(cfg.batch_size), "total": max(cfg.sizes),
            "step": k + 1, "edits": made, "requests": idx, "batch_rows": {str(i): step["rows"][i] for i in idx},
            "analysis": step["analysis"], "accuracy": step["accuracy"], "seconds": step["seconds"],
            "timing": {"diagnostic_seconds": step["diagnostic_seconds"]},
            "fingerprint": model_fingerprint(ctx.model), "evaluated": False}
    if run.alg == "AlphaEdit":
        cell["alphaedit_cache_rank"] = alphaedit_cache_ranks(ctx.model)
    start = time.perf_counter()
    cell["sequential"] = {"norms": step["analysis"]["norms"],
                          "key_drift": {str(j + 1): d for j, d in enumerate(key_drift(ctx.model, ctx.tok))}}
    if k + 1 in series.attribution:
        earlier = {j: [ctx.records[i] for i in series.steps[j - 1]] for j in range(1, k + 1)}
        cell["sequential"]["attribution"] = restore_attribution(ctx.model, ctx.tok, earlier, series.snapshots,
                                                                series.params)
    cell["timing"]["sequential_diagnostic_seconds"] = time.perf_counter() - start
    if cfg.curve or made in cfg.sizes or k == len(series.steps) - 1:
        scored = score_rows(ctx.model, ctx.tok, ctx.records[:made], series.reference.subset(range(made)), ccfg,
                            cell["timing"])
        per_edit = [{**series.rows[i], **scored[i]} for i in range(made)]
        cell.update(evaluated=True, evaluated_cases=[r.get("case_id") for r in ctx.records[:made]],
                    per_edit=per_edit, summary=summarize_ci(per_edit, cfg.n_boot, cfg.seed))
    write_cell(series.paths[k], cell, series.settings)
    if ctx.bar is not None:
        ctx.bar.update(len(idx))


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
        ReplayError: bad sizes; ``out_dir`` holds cells or a plan at another operating
            point than the hyperparameters' (:func:`~easyedit_replay.experiments.cells.check_out_point`);
            a finished cell made with other settings.
    """
    from tqdm.auto import tqdm

    from ..editor import resolve_templates
    from .report import write_scale_report

    check_sizes(cfg, len(records))
    sizes = cfg.sizes
    b = cfg.batch_size if cfg.sequential else None
    out = Path(out_dir)
    check_out_point(out, sorted({hp.operating_point for hp in hparams_by_alg.values()}))
    by_alg = {a: (hp.replace(stats_dir=stats_dir) if stats_dir else hp) for a, hp in hparams_by_alg.items()}
    templates = {a: resolve_templates(model, tok, hp) for a, hp in by_alg.items()}
    plan = planned_cells(cfg, list(by_alg))
    update_plan(out, plan, meta)
    ctx = _Context(model, tok, records, by_alg, cfg, out, templates)
    finished = [c for c in plan if cell_path(out, c).exists()]
    total = sum(cell_edits(c) for c in plan)
    ctx.bar = tqdm(total=total, initial=sum(cell_edits(c) for c in finished), desc="scale", unit="edit",
                   disable=not cfg.progress, smoothing=0.0)
    try:
        if b is None:
            for n in sizes:
                # One in-process anchor layer per size: a request's anchor from another size's chunks
                # differs in float rounding (the disk store, when on, serves it all the same).
                with shared_anchors(model, cfg):
                    for alg in by_alg:
                        for mode in cfg.modes:
                            existed = batch_path(out, n, alg, mode).exists()
                            _batch_cell(ctx, n, RunKey(alg, mode))  # a finished cell: only its settings are checked
                            if not existed:
                                ctx.bar.update(n)
        else:
            with shared_anchors(model, cfg):
                for alg in by_alg:
                    for mode in cfg.modes:
                        _sequential_series(ctx, RunKey(alg, mode))
    finally:
        ctx.bar.close()
    return write_scale_report(out, cfg.n_boot, cfg.seed) if report else None


def check_sizes(cfg: ScaleConfig, n_records: Optional[int]) -> None:
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
        n_steps = len(steps_of(sizes[-1], int(b))) if cfg.sequential else 0
        if not cfg.sequential or any(not 2 <= int(k) <= n_steps for k in cfg.attribution):
            raise ReplayError(f"--attribution {','.join(map(str, cfg.attribution))}: steps of a --sequential series "
                              f"that have an earlier batch, in 2..{n_steps}")
    cfg.sizes = sizes


def record_plan(out_dir, cfg: ScaleConfig, algs: Sequence[str], meta: Optional[dict] = None) -> Path:
    """Add the cells of ``cfg`` x ``algs`` to ``out_dir/scale.json`` without making any
    (``scale --plan-only``), so that the report lists the unfinished ones as missing;
    then rewrite the report. Returns ``out_dir/report.md``.

    Raises:
        ReplayError: bad sizes or batch size, or ``out_dir`` at another operating point
            than ``meta`` names (the checks of :func:`run_scale`).
    """
    from .report import write_scale_report

    check_sizes(cfg, None)
    out = Path(out_dir)
    if plan_points(meta):
        check_out_point(out, plan_points(meta))
    out.mkdir(parents=True, exist_ok=True)
    update_plan(out, planned_cells(cfg, list(algs)), meta)
    return write_scale_report(out, cfg.n_boot, cfg.seed)
