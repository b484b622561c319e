"""The batch-and-sequence loop behind ``compare`` and ``scale``, and ``compare`` itself.

For each algorithm and mode the same edits are applied from the same original
weights, either as independent batches of ``batch_size`` (each batch edited from
the original weights, evaluated, then undone; EasyEdit's ``batch_edit``) or
sequentially (all batches applied one after another to the same model; the
metrics of all edits are measured at the end, and after every batch for the
"metric vs number of edits" curve). :func:`edit_in_batches` is that loop;
``compare`` (:func:`run_mode`) and ``scale``'s sequential series
(:mod:`easyedit_replay.experiments.scale`) each pass it a per-step callback.
Cells are means over edits with a 95% bootstrap interval (percentile method, 1000
resamples of the edits, seeded).

Per mode it also reports the paper's section-4 analyses
(:mod:`easyedit_replay.diagnostics`): the residual ratio left at ``l_n`` after
each edited layer and the passive cosine of each edited layer, means over edits.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..anchors import in_process, recorded_as
from ..diagnostics import norm_report, passive_cosines, residual_ratios, target_accuracy
from ..editor import apply_plan, compute_edit, resolve_templates, weight_transaction
from ..evaluate import Evaluation, evaluate_records, greedy_generate, ngram_entropy
from ..targets import Construction, parse_mode
from ..tracing import resolve_parameter
from .metrics import RunKey, metrics
from .statistics import mean, summarize_analyses, summarize_ci


@dataclass
class CompareConfig:
    modes: Sequence[str] = ("spread", "replay")  # construction names (easyedit_replay.targets.MODES)
    batch_size: Optional[int] = None  # None: all edits in one batch
    sequential: bool = False
    fluency: bool = True
    fluency_tokens: int = 24
    target_accuracy: bool = True
    n_boot: int = 1000
    seed: int = 0
    progress: bool = True
    share_anchors: bool = True  # reuse anchors across modes and algorithms with the same anchor objective


def batches_of(items, size) -> List[List[int]]:
    """The indices of ``items`` in consecutive batches of ``size`` (one batch when None)."""
    size = size or len(items)
    return [list(range(i, min(i + size, len(items)))) for i in range(0, len(items), size)]


FLUENCY_BATCH = 128  # prompts per generate call: each decode step reads every weight once per batch


def fluency_scores(model, tok, records, tokens: int = 24) -> List[float]:
    """Fluency of each record: :func:`~easyedit_replay.evaluate.ngram_entropy` (bits) of
    ``tokens`` greedy new tokens after its edit prompt (MEMIT paper, section 5.2)."""
    gens = greedy_generate(model, tok, [r["prompt"] for r in records], max_new_tokens=tokens,
                           batch_size=FLUENCY_BATCH)
    return [ngram_entropy(g) for g in gens]


def shared_anchors(model, cfg: CompareConfig):
    """The block in which ``compare`` and ``scale`` run: with ``cfg.share_anchors`` an
    :func:`~easyedit_replay.anchors.in_process` layer for ``model``'s unedited weights, so
    every construction and algorithm with the same anchor objective (spreading, OneLayer,
    no-dividing and BLUE the ``l_n`` anchor, replay and BLUE the ``l_1`` anchor; MEMIT,
    EMMET and AlphaEdit when their YAMLs agree; never PMET's two deltas with another's)
    reuses the anchors the first one made, under the anchor cache's key."""
    return in_process(model) if cfg.share_anchors else nullcontext()


def edit_batch(model, tok, records, idx: Sequence[int], hp, construction: Construction, cfg: CompareConfig, templates,
               number: int, diagnose: bool = True, norm_reference: Optional[Dict[str, float]] = None) -> Dict:
    """Edit the batch ``records[i] for i in idx`` into ``model`` (compute + apply) with
    ``hp`` and the target ``construction``.

    Anchors come from the anchor cache (:func:`shared_anchors`). With
    ``diagnose`` the plan's section-4 analyses and, with ``cfg.target_accuracy``, the
    per-layer target accuracy are read; with ``norm_reference`` (the unedited model's
    mean output norm per module, :func:`~easyedit_replay.diagnostics.output_norms`) also
    the anchor and target norms relative to it (``analysis["norms"]``,
    :func:`~easyedit_replay.diagnostics.norm_report`). A norm-anchored edit reports its
    norm anchors in ``analysis["norm_anchor"]``.

    Returns:
        ``{"rows": {i: partial per-edit row}, "analysis": dict | None, "accuracy": dict |
        None, "seconds": compute + apply, "diagnostic_seconds": target accuracy,
        "update_norm": {weight name: |dW| (Frobenius)}}`` (``update_norm`` also without
        ``diagnose``; with it, ``analysis["update_norm"]`` is the same dict).
    """
    batch = [records[i] for i in idx]
    start = time.perf_counter()
    plan = compute_edit(model, tok, batch, hp, construction, context_templates=templates, progress=cfg.progress)
    apply_plan(model, plan, hp)
    out = {"rows": {}, "analysis": None, "accuracy": None, "seconds": time.perf_counter() - start,
           "diagnostic_seconds": 0.0, "update_norm": {r.weight_name: r.update_norm for r in plan.records}}
    if not diagnose:
        return out
    ratios, cosines = residual_ratios(plan), passive_cosines(plan)
    out["analysis"] = {"batch": number, "requests": list(idx),
                       "update_norm": out["update_norm"],
                       "residual_ratio": {str(l): v.tolist() for l, v in ratios.items()},
                       "passive_cosine": {str(l): v.tolist() for l, v in cosines.items()}}
    if plan.targets.info:  # construction-specific cost (replay_joint: seconds, iterations)
        out["analysis"]["targets"] = dict(plan.targets.info)
    if norm_reference is not None:
        out["analysis"]["norms"] = norm_report(plan, norm_reference)
    if plan.sequential is not None and plan.sequential.norms:
        out["analysis"]["norm_anchor"] = dict(plan.sequential.norms)
    last = list(ratios)[-1]
    out["rows"] = {i: {"final_ratio": float(ratios[last][k])} for k, i in enumerate(idx)}
    if cfg.target_accuracy:
        start = time.perf_counter()
        acc = target_accuracy(model, tok, plan, hp)
        out["accuracy"] = {"batch": number, "requests": list(idx), "sites": [a.to_dict() for a in acc]}
        for k, i in enumerate(idx):
            per_site = [float(a.relative_error[:, k].mean()) for a in acc]
            final = [float(a.relative_error[-1, k]) for a in acc]
            out["rows"][i].update({"target_error": sum(per_site) / len(per_site),
                                   "final_error": sum(final) / len(final),
                                   "anchor_nll": float(acc[0].anchor_nll[k]),
                                   "edited_nll": float(acc[0].edited_nll[k])})
        out["diagnostic_seconds"] = time.perf_counter() - start
    return out


def edit_in_batches(model, tok, records, steps: Sequence[Sequence[int]], hp, construction: Construction,
                    cfg: CompareConfig, templates, on_step: Callable[[int, Sequence[int], Dict], None], params=None,
                    redo: int = 0, on_redo: Optional[Callable[[int, Sequence[int], Dict], None]] = None,
                    norm_reference: Optional[Dict[str, float]] = None, finish: Optional[Callable[[], None]] = None,
                    recorded: Sequence[Optional[str]] = ()):
    """The batch-and-sequence loop: edit ``records[i] for i in steps[k]`` for each ``k``
    with :func:`edit_batch`, from the original weights (``cfg.sequential`` False: each
    batch is undone after its ``on_step``) or on top of the batches before it
    (``cfg.sequential``). Every weight the edit writes is restored at the end.

    Args:
        on_step: ``on_step(k, idx, step)`` after batch ``k`` is applied (``step``:
            :func:`edit_batch`'s dict), while the model holds it: evaluate, write a cell.
        params: ``{weight name: parameter}`` the edit writes (default: from ``hp``).
        redo: the first ``redo`` steps re-apply batches a stopped run finished (no
            diagnostics, no ``on_step``; ``on_redo(k, idx, step)`` instead, ``step``
            :func:`edit_batch`'s dict without the analyses).
        recorded: per step ``k``, the fingerprint a stopped run recorded for the weights
            before it (None: none recorded, as before the first step); step ``k``'s
            anchors are keyed under it (:func:`~easyedit_replay.anchors.store.recorded_as`),
            so a series resumed on another machine, whose re-applied weights differ from
            the recorded ones by float rounding, is served the anchors banked for them.
            Read at each step, so ``on_redo`` may clear the entries of later steps.
        norm_reference: handed to :func:`edit_batch` for the steps that are made.
        finish: called after the last batch, before the weights are restored
            (``compare``'s final evaluation of a sequential run).
    """
    from ..algorithms import weight_names

    params = params if params is not None else {n: resolve_parameter(model, n) for n in weight_names(hp)}
    with weight_transaction(params, restore_always=True):
        for k, idx in enumerate(steps):
            with weight_transaction(params, restore_always=not cfg.sequential), \
                    recorded_as(model, recorded[k] if k < len(recorded) else None):
                if k < redo:
                    step = edit_batch(model, tok, records, idx, hp, construction, cfg, templates, k, diagnose=False)
                    if on_redo is not None:
                        on_redo(k, idx, step)
                    continue
                step = edit_batch(model, tok, records, idx, hp, construction, cfg, templates, k,
                                  norm_reference=norm_reference)
                on_step(k, idx, step)
        if finish is not None:
            finish()


def score_rows(model, tok, records, baseline: Evaluation, cfg: CompareConfig,
               timing: Optional[dict] = None) -> List[dict]:
    """The reported metrics of ``records`` on the model as it is: the rows of
    :func:`evaluate_records` against ``baseline`` (its evaluation of the same records on
    the unedited model) plus ``fluency`` (None without ``cfg.fluency``). Adds the seconds spent to ``timing["eval_seconds"]``
    and ``timing["fluency_seconds"]`` when given."""
    start = time.perf_counter()
    scored = evaluate_records(model, tok, records, baseline)
    mid = time.perf_counter()
    flu = fluency_scores(model, tok, records, cfg.fluency_tokens) if cfg.fluency else [None] * len(records)
    if timing is not None:
        timing["eval_seconds"] = timing.get("eval_seconds", 0.0) + mid - start
        timing["fluency_seconds"] = timing.get("fluency_seconds", 0.0) + time.perf_counter() - mid
    return [{**row, "fluency": f} for row, f in zip(scored.rows, flu)]


def run_mode(model, tok, records, hp, construction: Construction, cfg: CompareConfig, baseline, templates,
             bar=None) -> Dict:
    """Edit ``records`` with ``hp`` (its ``alg_name`` sets the algorithm) and the target
    ``construction`` (:func:`mode_hparams` gives both for a mode spec).

    Inside :func:`shared_anchors`, anchors optimized on the unedited weights by an
    earlier mode or algorithm with the same anchor objective are reused (independent
    batches, and the first batch of a sequential run); the edit is then identical to
    reading them from the disk store, minus the time.
    """
    rows: List[Optional[dict]] = [None] * len(records)
    accuracies, curve, seconds, analyses = [], [], [], []
    timing = {"diagnostic_seconds": 0.0, "eval_seconds": 0.0, "fluency_seconds": 0.0}
    steps = batches_of(records, cfg.batch_size)

    def on_step(b, idx, step):
        seconds.append(step["seconds"])
        timing["diagnostic_seconds"] += step["diagnostic_seconds"]
        analyses.append(step["analysis"])
        if step["accuracy"] is not None:
            accuracies.append(step["accuracy"])
        for i, row in step["rows"].items():
            rows[i] = row
        if not cfg.sequential:
            scored = score_rows(model, tok, [records[i] for i in idx], baseline.subset(idx), cfg, timing)
            for k, i in enumerate(idx):
                rows[i] = {**(rows[i] or {}), **scored[k]}
        else:
            done = [i for bb in steps[: b + 1] for i in bb]
            start = time.perf_counter()
            scored = evaluate_records(model, tok, [records[i] for i in done], baseline.subset(done)).rows
            timing["eval_seconds"] += time.perf_counter() - start
            curve.append({"edits": len(done), **{m.key: mean(r[m.key] for r in scored) for m in metrics("curve")}})
        if bar is not None:
            bar.update(len(idx))

    def finish():
        if cfg.sequential:
            scored = score_rows(model, tok, records, baseline, cfg, timing)
            for i in range(len(records)):
                rows[i] = {**(rows[i] or {}), **scored[i]}

    edit_in_batches(model, tok, records, steps, hp, construction, cfg, templates, on_step, finish=finish)
    return {"per_edit": rows, "seconds": sum(seconds), "batch_seconds": seconds, "target_accuracy": accuracies,
            "analyses": analyses, "diagnostics": summarize_analyses(analyses), "curve": curve,
            "edit_layers": construction.edit_layers(hp.layers), "timing": timing}


def mode_hparams(hp, base: str, mode: str) -> Tuple[object, Construction]:
    """``(hp, construction)`` for algorithm ``base`` in mode spec ``mode`` (``"replay"``,
    ``"replay_tau=0.25"``, ``"replay+rekeyed"``): the construction the spec names, with
    its parameter, and a copy of ``hp`` labelled with the registered ``alg_name``, the
    parameter's YAML alias and the options' fields (cells are keyed by them).

    Raises:
        ValueError, HyperParamsError: as :func:`~easyedit_replay.targets.parse_mode`."""
    from ..algorithms import alg_name_of

    construction, params = parse_mode(mode)
    return hp.replace(alg_name=alg_name_of(base, construction.name), **params), construction


def unedited_block(model, tok, records, cfg: CompareConfig):
    """``(baseline, block)``: :func:`evaluate_records` of the unedited model (the
    :class:`~easyedit_replay.evaluate.Evaluation` every edited cell is compared with) and the reported
    block ``{"per_edit", "summary"}`` of the unedited model against itself
    (specificity 1, DKL 0: a check of the metrics)."""
    baseline = evaluate_records(model, tok, records, None)
    unedited = score_rows(model, tok, records, baseline, cfg)
    return baseline, {"per_edit": unedited, "summary": summarize_ci(unedited, cfg.n_boot, cfg.seed)}


def run_comparison(model, tok, records, hparams_by_alg: Dict[str, object], cfg: CompareConfig, stats_dir=None) -> Dict:
    """Run every algorithm in ``hparams_by_alg`` (base name -> hparams) in every mode.

    Returns:
        ``{"n", "config", "unedited": {"per_edit", "summary"}, "runs": {"ALG/mode": run}}``
        (:func:`run_mode`'s run plus ``summary`` and ``layers``; the key is
        :attr:`~easyedit_replay.experiments.metrics.RunKey.text`).
    """
    from tqdm.auto import tqdm

    baseline, unedited = unedited_block(model, tok, records, cfg)
    results = {"n": len(records), "config": cfg.__dict__.copy(), "unedited": unedited, "runs": {}}
    total = len(hparams_by_alg) * len(cfg.modes) * len(records)
    bar = tqdm(total=total, desc="editing", unit="edit", disable=not cfg.progress)
    with shared_anchors(model, cfg):
        for base, hp0 in hparams_by_alg.items():
            if stats_dir:
                hp0 = hp0.replace(stats_dir=stats_dir)
            templates = resolve_templates(model, tok, hp0)
            for mode in cfg.modes:
                hp, construction = mode_hparams(hp0, base, mode)
                run = run_mode(model, tok, records, hp, construction, cfg, baseline, templates, bar)
                run["summary"] = summarize_ci(run["per_edit"], cfg.n_boot, cfg.seed)
                run["layers"] = list(hp.layers)
                results["runs"][RunKey(base, mode).text] = run
    bar.close()
    return results
