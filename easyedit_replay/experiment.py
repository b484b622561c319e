"""The comparison behind ``easyedit-replay compare``: algorithms x target constructions
(spread, replay, and the paper's baselines blue, onelayer, nodiv, replay_remaining).

For each algorithm and mode the same edits are applied from the same original
weights, either as independent batches of ``batch_size`` (each batch edited from
the original weights, evaluated, then undone; EasyEdit's ``batch_edit``) or
sequentially (all batches applied one after another to the same model; the
metrics of all edits are measured at the end, and after every batch for the
"metric vs number of edits" curve). Cells are means over edits with a 95%
bootstrap interval (percentile method, 1000 resamples of the edits, seeded).

Per mode it also reports the paper's section-4 analyses
(:mod:`easyedit_replay.diagnostics`): the residual ratio left at ``l_n`` after
each edited layer and the passive cosine of each edited layer, means over edits.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .diagnostics import norm_report, passive_cosines, residual_ratios, target_accuracy
from .editor import apply_plan, compute_edit, resolve_templates, weight_transaction
from .evaluate import evaluate_records, greedy_generate, ngram_entropy
from .targets import parse_mode
from .tracing import resolve_parameter

# (key, column header): the paper's metrics first, then EasyEdit's and ours.
PAPER_METRICS = (
    ("efficacy_win", "eff. Success"),
    ("efficacy_exact", "eff. Acc"),
    ("generalization_win", "gen. Success"),
    ("generalization_exact", "gen. Acc"),
    ("locality_dkl", "DKL"),
    ("locality_top1", "Top-1"),
    ("locality_top5", "Top-5"),
    ("locality_top10", "Top-10"),
)
EASYEDIT_METRICS = (
    ("efficacy_acc", "efficacy"),
    ("generalization_acc", "generalization"),
    ("specificity", "specificity"),
    ("fluency", "fluency"),
    ("target_error", "target error"),
    ("final_ratio", "final resid. ratio"),
)
METRICS = PAPER_METRICS + EASYEDIT_METRICS
CURVE_METRICS = ("efficacy_win", "generalization_win", "efficacy_acc", "generalization_acc", "specificity",
                 "locality_dkl")


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


def bootstrap(values: Sequence[Optional[float]], n_boot: int = 1000, seed: int = 0):
    """``(mean, lo, hi)``: the mean of ``values`` (Nones dropped) and its 95% percentile
    bootstrap interval over ``n_boot`` resamples; ``(None, None, None)`` if empty."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None, None
    rng = random.Random(seed)
    n = len(vals)
    means = sorted(sum(rng.choices(vals, k=n)) / n for _ in range(n_boot))
    lo, hi = means[int(0.025 * (n_boot - 1))], means[int(math.ceil(0.975 * (n_boot - 1)))]
    return sum(vals) / n, lo, hi


def _batches(items, size):
    size = size or len(items)
    return [list(range(i, min(i + size, len(items)))) for i in range(0, len(items), size)]


FLUENCY_BATCH = 128  # prompts per generate call: each decode step reads every weight once per batch


def fluency_scores(model, tok, records, tokens: int = 24) -> List[float]:
    """Fluency of each record: :func:`~easyedit_replay.evaluate.ngram_entropy` (bits) of
    ``tokens`` greedy new tokens after its edit prompt (MEMIT paper, section 5.2)."""
    gens = greedy_generate(model, tok, [r["prompt"] for r in records], max_new_tokens=tokens,
                           batch_size=FLUENCY_BATCH)
    return [ngram_entropy(g) for g in gens]


ANCHOR_FIELDS = ("layer_module_tmp", "fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer",
                 "v_weight_decay", "clamp_norm_factor", "kl_factor", "ln_f_module", "lm_head_module",
                 "anchor_batch_size", "post_norm")  # post_norm: a post-norm block's anchor site (postnorm.py)


def anchor_key(model, hp, layer: int, batch: Sequence[int], templates=()):
    """What an anchor depends on besides the (unedited) weights: its layer, the
    anchor-objective hyperparameters, the rule's anchor sites, objective and target
    spelling, and the batch of requests. Spreading, OneLayer, no-dividing and BLUE
    share the ``l_n`` anchor, replay and BLUE the ``l_1`` anchor; MEMIT, EMMET and
    AlphaEdit share them when their YAMLs agree on these fields; PMET (two deltas)
    does not. ``templates`` are the context templates the anchor was optimized on."""
    from .algorithms import get_algorithm

    rule = get_algorithm(hp.alg_name).rule
    fields = tuple((f, repr(getattr(hp, f, None))) for f in ANCHOR_FIELDS)
    objective = repr(sorted(rule.anchor_objective(hp).items()))
    return (int(layer), fields, tuple(rule.anchor_templates(hp)), objective, rule.leading_space(model, hp),
            tuple(batch), repr(templates))


def _public(row: dict) -> dict:
    """``row`` without the keys that hold tensors for later comparisons (``_...``)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def edit_batch(model, tok, records, idx: Sequence[int], hp, cfg: CompareConfig, templates, anchors: Optional[dict],
               pristine: bool, number: int, diagnose: bool = True,
               norm_reference: Optional[Dict[str, float]] = None) -> Dict:
    """Edit the batch ``records[i] for i in idx`` into ``model`` (compute + apply).

    ``anchors`` (a dict shared across calls, keyed by :func:`anchor_key`) lends and
    receives anchors when ``pristine`` (the weights are the unedited ones). With
    ``diagnose`` the plan's section-4 analyses and, with ``cfg.target_accuracy``, the
    per-layer target accuracy are read; with ``norm_reference`` (the unedited model's
    mean output norm per module, :func:`~easyedit_replay.diagnostics.output_norms`) also
    the anchor and target norms relative to it (``analysis["norms"]``,
    :func:`~easyedit_replay.diagnostics.norm_report`). A norm-anchored edit reports its
    norm anchors in ``analysis["norm_anchor"]``.

    Returns:
        ``{"rows": {i: partial per-edit row}, "analysis": dict | None, "accuracy": dict |
        None, "seconds": compute + apply, "diagnostic_seconds": target accuracy}``.
    """
    from .algorithms import get_algorithm

    construction = get_algorithm(hp.alg_name).construction
    batch = [records[i] for i in idx]
    keys = {l: anchor_key(model, hp, l, idx, templates) for l in construction.anchor_layers(hp.layers)}
    pool = {l: anchors[k] for l, k in keys.items() if pristine and anchors is not None and k in anchors}
    start = time.perf_counter()
    plan = compute_edit(model, tok, batch, hp, context_templates=templates, progress=cfg.progress, anchor=pool)
    apply_plan(model, plan, hp)
    out = {"rows": {}, "analysis": None, "accuracy": None, "seconds": time.perf_counter() - start,
           "diagnostic_seconds": 0.0}
    if pristine and anchors is not None:
        anchors.update({k: plan.anchors[l] for l, k in keys.items()})
    if not diagnose:
        return out
    ratios, cosines = residual_ratios(plan), passive_cosines(plan)
    out["analysis"] = {"batch": number, "requests": list(idx),
                       "update_norm": {r.weight_name: r.update_norm for r in plan.records},
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


def score_rows(model, tok, records, baseline, cfg: CompareConfig, timing: Optional[dict] = None) -> List[dict]:
    """The reported metrics of ``records`` on the model as it is: :func:`evaluate_records`
    against ``baseline`` (one row per record, ``_`` keys dropped) plus ``fluency``
    (None without ``cfg.fluency``). Adds the seconds spent to ``timing["eval_seconds"]``
    and ``timing["fluency_seconds"]`` when given."""
    start = time.perf_counter()
    scored = evaluate_records(model, tok, records, baseline)
    mid = time.perf_counter()
    flu = fluency_scores(model, tok, records, cfg.fluency_tokens) if cfg.fluency else [None] * len(records)
    if timing is not None:
        timing["eval_seconds"] = timing.get("eval_seconds", 0.0) + mid - start
        timing["fluency_seconds"] = timing.get("fluency_seconds", 0.0) + time.perf_counter() - mid
    return [{**_public(row), "fluency": f} for row, f in zip(scored, flu)]


def run_mode(model, tok, records, hp, cfg: CompareConfig, baseline, templates, bar=None,
             anchors: Optional[dict] = None) -> Dict:
    """Edit ``records`` with ``hp`` (its ``alg_name`` sets algorithm and mode).

    ``anchors`` (a dict shared across calls) reuses anchors optimized on the
    unedited weights by an earlier mode or algorithm with the same
    :func:`anchor_key` (independent batches, and the first batch of a sequential
    run); the edit is then identical to optimizing them again, minus the time.
    """
    from .algorithms import get_algorithm, weight_names

    construction = get_algorithm(hp.alg_name).construction
    params = {n: resolve_parameter(model, n) for n in weight_names(hp)}
    rows: List[Optional[dict]] = [None] * len(records)
    accuracies, curve, seconds, analyses = [], [], [], []
    timing = {"diagnostic_seconds": 0.0, "eval_seconds": 0.0, "fluency_seconds": 0.0}
    with weight_transaction(params, restore_always=True):
        for b, idx in enumerate(_batches(records, cfg.batch_size)):
            with weight_transaction(params, restore_always=not cfg.sequential):
                pristine = not cfg.sequential or b == 0
                step = edit_batch(model, tok, records, idx, hp, cfg, templates, anchors, pristine, b)
                seconds.append(step["seconds"])
                timing["diagnostic_seconds"] += step["diagnostic_seconds"]
                analyses.append(step["analysis"])
                if step["accuracy"] is not None:
                    accuracies.append(step["accuracy"])
                for i, row in step["rows"].items():
                    rows[i] = row
                if not cfg.sequential:
                    scored = score_rows(model, tok, [records[i] for i in idx], [baseline[i] for i in idx], cfg, timing)
                    for k, i in enumerate(idx):
                        rows[i] = {**(rows[i] or {}), **scored[k]}
                else:
                    done = [i for bb in _batches(records, cfg.batch_size)[: b + 1] for i in bb]
                    start = time.perf_counter()
                    scored = evaluate_records(model, tok, [records[i] for i in done], [baseline[i] for i in done])
                    timing["eval_seconds"] += time.perf_counter() - start
                    curve.append({"edits": len(done), **{k: _mean(r[k] for r in scored) for k in CURVE_METRICS}})
            if bar is not None:
                bar.update(len(idx))
        if cfg.sequential:
            scored = score_rows(model, tok, records, baseline, cfg, timing)
            for i in range(len(records)):
                rows[i] = {**(rows[i] or {}), **scored[i]}
    return {"per_edit": rows, "seconds": sum(seconds), "batch_seconds": seconds, "target_accuracy": accuracies,
            "analyses": analyses, "diagnostics": summarize_analyses(analyses), "curve": curve,
            "edit_layers": construction.edit_layers(hp.layers), "timing": timing}


def summarize_analyses(analyses: Sequence[dict]) -> Dict[str, Dict[str, float]]:
    """``{"residual_ratio": {layer: mean}, "passive_cosine": {layer: mean}}`` over every
    request of every batch (the paper's Tables 2/5 and 1)."""
    out: Dict[str, Dict[str, float]] = {}
    for name in ("residual_ratio", "passive_cosine"):
        per_layer: Dict[str, List[float]] = {}
        for a in analyses:
            for layer, values in a[name].items():
                per_layer.setdefault(layer, []).extend(values)
        out[name] = {layer: sum(v) / len(v) for layer, v in per_layer.items()}
    return out


def _mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize_ci(rows, n_boot, seed) -> Dict[str, tuple]:
    return {k: bootstrap([r.get(k) for r in rows], n_boot, seed) for k, _ in METRICS}


def mode_hparams(hp, base: str, mode: str):
    """``hp`` for algorithm ``base`` in mode spec ``mode`` (``"replay"``, or
    ``"replay_tau=0.25"``, which also sets ``hparams.replay_tau``): a copy with the
    registered ``alg_name`` and the spec's parameter."""
    from .algorithms import alg_name_of

    construction, params = parse_mode(mode)
    return hp.replace(alg_name=alg_name_of(base, construction.name), **params)


def unedited_block(model, tok, records, cfg: CompareConfig):
    """``(baseline, block)``: :func:`evaluate_records` of the unedited model (the
    reference every edited cell is compared with, ``_`` keys kept) and the reported
    block ``{"per_edit", "summary"}`` of the unedited model against itself
    (specificity 1, DKL 0: a check of the metrics)."""
    baseline = evaluate_records(model, tok, records, None)
    unedited = score_rows(model, tok, records, baseline, cfg)
    return baseline, {"per_edit": unedited, "summary": summarize_ci(unedited, cfg.n_boot, cfg.seed)}


def run_comparison(model, tok, records, hparams_by_alg: Dict[str, object], cfg: CompareConfig, stats_dir=None) -> Dict:
    """Run every algorithm in ``hparams_by_alg`` (base name -> hparams) in every mode."""
    from tqdm.auto import tqdm

    baseline, unedited = unedited_block(model, tok, records, cfg)
    results = {"n": len(records), "config": cfg.__dict__.copy(), "unedited": unedited, "runs": {}}
    total = len(hparams_by_alg) * len(cfg.modes) * len(records)
    bar = tqdm(total=total, desc="editing", unit="edit", disable=not cfg.progress)
    anchors: dict = {} if cfg.share_anchors else None
    for base, hp0 in hparams_by_alg.items():
        if stats_dir:
            hp0 = hp0.replace(stats_dir=stats_dir)
        templates = resolve_templates(model, tok, hp0)
        for mode in cfg.modes:
            hp = mode_hparams(hp0, base, mode)
            run = run_mode(model, tok, records, hp, cfg, baseline, templates, bar, anchors)
            run["summary"] = summarize_ci(run["per_edit"], cfg.n_boot, cfg.seed)
            run["layers"] = list(hp.layers)
            results["runs"][f"{base}/{mode}"] = run
    bar.close()
    return results


# ----------------------------------------------------------------------------- output


def _cell(stat) -> str:
    mean, lo, hi = stat
    if mean is None:
        return "-"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def table_rows(results, metrics=METRICS) -> List[List[str]]:
    """Rows of the summary table (header first): one per algorithm and mode."""
    header = ["algorithm", "mode"] + [h for _, h in metrics] + ["edit time s"]
    rows = [header, ["-", "unedited"] + [_cell(results["unedited"]["summary"][k]) for k, _ in metrics] + ["-"]]
    for key, run in results["runs"].items():
        base, mode = key.split("/")
        rows.append([base, mode] + [_cell(run["summary"][k]) for k, _ in metrics] + [f"{run['seconds']:.1f}"])
    return rows


def analysis_rows(results, name: str = "residual_ratio") -> List[List[str]]:
    """Rows of a per-layer analysis table (``residual_ratio`` or ``passive_cosine``):
    one per algorithm and mode, one column per edit layer ("-" where not edited)."""
    layers = sorted({int(l) for run in results["runs"].values() for l in run["diagnostics"][name]})
    rows = [["algorithm", "mode"] + [f"layer {l}" for l in layers]]
    for key, run in results["runs"].items():
        values = run["diagnostics"][name]
        rows.append(key.split("/") + [f"{values[str(l)]:.3f}" if str(l) in values else "-" for l in layers])
    return rows


def render_report(results) -> str:
    """The three tables of a comparison as plain text (terminal)."""
    return "\n\n".join([
        "the paper's metrics (Success: P(new) > P(true); Acc: exact match under greedy decoding; "
        "DKL / Top-k: next-token distribution on neighbourhood prompts vs the unedited model)",
        render_text(table_rows(results, PAPER_METRICS)),
        "EasyEdit's metrics and diagnostics (token accuracy, locality, n-gram entropy, target error, "
        "final-layer residual ratio)",
        render_text(table_rows(results, EASYEDIT_METRICS)),
        "residual ratio |m_L - h_L(after layer)| / |m_L - h_L(unedited)| (the paper's Tables 2 and 5; lower is better)",
        render_text(analysis_rows(results, "residual_ratio")),
        "cosine of each layer's own output change with the change it causes at l_n (the paper's Table 1)",
        render_text(analysis_rows(results, "passive_cosine")),
    ])


def render_text(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def render_markdown(rows) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def plot_target_error(results, path: Path) -> Optional[Path]:
    """Per-layer mean relative target error, spread vs replay, one panel per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algs = sorted({k.split("/")[0] for k, r in results["runs"].items() if r["target_accuracy"]})
    if not algs:
        return None
    fig, axes = plt.subplots(1, len(algs), figsize=(4.2 * len(algs), 3.4), squeeze=False)
    for ax, alg in zip(axes[0], algs):
        for key, run in results["runs"].items():
            base, mode = key.split("/")
            if base != alg or not run["target_accuracy"]:
                continue
            layers = run["edit_layers"]
            per_layer = torch.tensor([[s["mean_by_layer"] for s in b["sites"]] for b in run["target_accuracy"]])
            ax.plot(layers, per_layer.mean(dim=(0, 1)).tolist(), "s-" if mode.startswith("replay") else "o--",
                    label=mode)
        ax.set_title(alg)
        ax.set_xlabel("edit layer")
        ax.set_ylabel("|h - target| / |target|")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("target error per edit layer after the edit (lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_residual_ratio(results, path: Path) -> Optional[Path]:
    """Residual ratio at ``l_n`` vs edit layer, one line per mode, one panel per algorithm
    (the paper's convergence claim: replay's ratio falls fastest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algs = list(dict.fromkeys(k.split("/")[0] for k in results["runs"]))
    if not algs:
        return None
    fig, axes = plt.subplots(1, len(algs), figsize=(4.2 * len(algs), 3.4), squeeze=False)
    markers = dict(zip(("spread", "replay", "replay_remaining", "blue", "onelayer", "nodiv"), "osv^Dx"))
    for ax, alg in zip(axes[0], algs):
        for key, run in results["runs"].items():
            if key.split("/")[0] != alg:
                continue
            mode = key.split("/")[1]
            values = run["diagnostics"]["residual_ratio"]
            layers = sorted(int(l) for l in values)
            ax.plot(layers, [values[str(l)] for l in layers], marker=markers.get(mode, "."),
                    linestyle="-" if mode.startswith("replay") else "--", label=mode)
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_title(alg)
        ax.set_xlabel("after editing layer")
        ax.set_ylabel("|m_L - h_L| / |m_L - h_L(unedited)|")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("final-layer residual left after each edited layer (lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sequential(results, path: Path) -> Optional[Path]:
    """Efficacy, generalization and specificity of all edits so far vs number of edits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: r for k, r in results["runs"].items() if r["curve"]}
    if not runs:
        return None
    keys = [("efficacy_win", "efficacy Success"), ("generalization_win", "generalization Success"),
            ("locality_dkl", "DKL (lower is better)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, run in sorted(runs.items()):
        style = "-" if key.endswith("replay") else "--"
        xs = [c["edits"] for c in run["curve"]]
        for ax, (m, title) in zip(axes, keys):
            ax.plot(xs, [c[m] for c in run["curve"]], style, marker=".", label=key)
            ax.set_title(title)
            ax.set_xlabel("edits applied")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("sequential editing: metrics of all edits so far (solid: replay, dashed: spread)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results, out_dir, title: str) -> Dict[str, Path]:
    """``report.md``, ``results.json`` and PNG plots in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.json"}
    files["results"].write_text(json.dumps(results, indent=1, default=str))
    plots = {"residual_ratio": plot_residual_ratio(results, out / "residual_ratio.png"),
             "target_error": plot_target_error(results, out / "target_error.png"),
             "sequential": plot_sequential(results, out / "sequential.png")}
    lines = [f"# {title}", "", "## The paper's metrics", "", render_markdown(table_rows(results, PAPER_METRICS)), "",
             "Success: P(new) > P(true), teacher-forced; Acc: exact match of the target under greedy decoding; "
             "DKL: KL(unedited || edited) of the next-token distribution at the end of the neighbourhood prompt "
             "(lower is better); Top-k: overlap of the top-k next tokens with the unedited model's.", "",
             "## EasyEdit's metrics and diagnostics", "", render_markdown(table_rows(results, EASYEDIT_METRICS)), "",
             "efficacy / generalization: teacher-forced token accuracy; specificity: unchanged locality "
             "predictions; fluency: n-gram entropy of greedy continuations; target error: mean over edited "
             "layers of |h - target| / |target| after the edit; final resid. ratio: the ratio below at the "
             "last edited layer.", "",
             "## Residual ratio after each edited layer (the paper's Tables 2 and 5)", "",
             render_markdown(analysis_rows(results, "residual_ratio")), "",
             "|m_L - h_L(after layer)| / |m_L - h_L(unedited)| at the last edit layer l_n; m_L is the "
             "construction's final target (spread/nodiv/onelayer/blue: the anchor at l_n; replay: the replayed "
             "z^{l_n}). Mean over edits.", "",
             "## Passive cosine (the paper's Table 1)", "", render_markdown(analysis_rows(results, "passive_cosine")),
             "", "Cosine between a layer's own output change and the change it causes at l_n. Mean over edits.", "",
             "Cells of the first two tables: mean over edits [95% bootstrap interval].", ""]
    for name, p in plots.items():
        if p:
            files[name] = p
            lines += [f"![{name}]({p.name})", ""]
    files["report"] = out / "report.md"
    files["report"].write_text("\n".join(lines))
    return files
