"""The comparison behind ``easyedit-replay compare``: algorithms x {spread, replay}.

For each algorithm and mode the same edits are applied from the same original
weights, either as independent batches of ``batch_size`` (each batch edited from
the original weights, evaluated, then undone; EasyEdit's ``batch_edit``) or
sequentially (all batches applied one after another to the same model; the
metrics of all edits are measured at the end, and after every batch for the
"metric vs number of edits" curve). Cells are means over edits with a 95%
bootstrap interval (percentile method, 1000 resamples of the edits, seeded).
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

from .diagnostics import target_accuracy
from .editor import apply_edit, last_plan, resolve_templates, weight_transaction
from .evaluate import evaluate_records, greedy_generate, ngram_entropy
from .stats import second_moments
from .tracing import resolve_parameter

METRICS = (
    ("efficacy_acc", "efficacy"),
    ("efficacy_win", "eff. P(new)>P(true)"),
    ("generalization_acc", "generalization"),
    ("specificity", "specificity"),
    ("fluency", "fluency"),
    ("target_error", "target error"),
)


@dataclass
class CompareConfig:
    modes: Sequence[str] = ("spread", "replay")
    batch_size: Optional[int] = None  # None: all edits in one batch
    sequential: bool = False
    fluency: bool = True
    fluency_tokens: int = 24
    target_accuracy: bool = True
    n_boot: int = 1000
    seed: int = 0
    progress: bool = True
    share_anchors: bool = True  # reuse anchors across algorithms with the same anchor objective


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


def _fluency(model, tok, records, tokens) -> List[float]:
    gens = greedy_generate(model, tok, [r["prompt"] for r in records], max_new_tokens=tokens)
    return [ngram_entropy(g) for g in gens]


ANCHOR_FIELDS = ("layers", "layer_module_tmp", "fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer",
                 "v_weight_decay", "clamp_norm_factor", "kl_factor", "ln_f_module", "lm_head_module",
                 "anchor_batch_size")


def anchor_key(model, hp, mode: str, batch: Sequence[int], templates=()):
    """What an anchor depends on besides the (unedited) weights: the mode (which
    layer), the anchor-objective hyperparameters, the rule's anchor sites,
    objective and target spelling, and the batch of requests. MEMIT, EMMET and
    AlphaEdit share it when their YAMLs agree on these fields; PMET (two deltas)
    does not. ``templates`` are the context templates the anchor was optimized on."""
    from .algorithms import get_algorithm

    rule = get_algorithm(hp.alg_name).rule
    fields = tuple((f, repr(getattr(hp, f, None))) for f in ANCHOR_FIELDS)
    objective = repr(sorted(rule.anchor_objective(hp).items()))
    return (mode, fields, tuple(rule.anchor_templates(hp)), objective, rule.leading_space(model, hp), tuple(batch),
            repr(templates))


def run_mode(model, tok, records, hp, cfg: CompareConfig, baseline, templates, bar=None,
             anchors: Optional[dict] = None) -> Dict:
    """Edit ``records`` with ``hp`` (its ``alg_name`` sets algorithm and mode).

    ``anchors`` (a dict shared across calls) reuses anchors optimized on the
    unedited weights by an earlier algorithm with the same :func:`anchor_key`
    (independent batches, and the first batch of a sequential run); the edit is
    then identical to optimizing them again, minus the time.
    """
    names = [f"{t.format(l)}.weight" for l in hp.layers for t in hp.rewrite_templates()]
    params = {n: resolve_parameter(model, n) for n in names}
    rows: List[Optional[dict]] = [None] * len(records)
    accuracies, curve, seconds = [], [], []
    with weight_transaction(params, restore_always=True):
        for b, idx in enumerate(_batches(records, cfg.batch_size)):
            batch = [records[i] for i in idx]
            with weight_transaction(params, restore_always=not cfg.sequential):
                pristine = anchors is not None and (not cfg.sequential or b == 0)
                key = anchor_key(model, hp, mode_of(hp), idx, templates) if pristine else None
                start = time.perf_counter()
                apply_edit(model, tok, batch, hp, context_templates=templates, progress=cfg.progress,
                           anchor=anchors.get(key) if pristine else None)
                seconds.append(time.perf_counter() - start)
                if pristine and key not in anchors:
                    anchors[key] = last_plan(model).anchor
                if cfg.target_accuracy:
                    acc = target_accuracy(model, tok, last_plan(model), hp)
                    accuracies.append({"batch": b, "requests": idx, "sites": [a.to_dict() for a in acc]})
                    for k, i in enumerate(idx):
                        per_site = [float(a.relative_error[:, k].mean()) for a in acc]
                        final = [float(a.relative_error[-1, k]) for a in acc]
                        rows[i] = {"target_error": sum(per_site) / len(per_site), "final_error": sum(final) / len(final),
                                   "anchor_nll": float(acc[0].anchor_nll[k]), "edited_nll": float(acc[0].edited_nll[k])}
                if not cfg.sequential:
                    scored = evaluate_records(model, tok, batch, [baseline[i] for i in idx])
                    flu = _fluency(model, tok, batch, cfg.fluency_tokens) if cfg.fluency else [None] * len(batch)
                    for k, i in enumerate(idx):
                        rows[i] = {**(rows[i] or {}), **scored[k], "fluency": flu[k]}
                else:
                    done = [i for bb in _batches(records, cfg.batch_size)[: b + 1] for i in bb]
                    scored = evaluate_records(model, tok, [records[i] for i in done], [baseline[i] for i in done])
                    curve.append({"edits": len(done), **{k: _mean(r[k] for r in scored) for k, _ in METRICS[:4]}})
            if bar is not None:
                bar.update(len(idx))
        if cfg.sequential:
            scored = evaluate_records(model, tok, records, baseline)
            flu = _fluency(model, tok, records, cfg.fluency_tokens) if cfg.fluency else [None] * len(records)
            for i in range(len(records)):
                rows[i] = {**(rows[i] or {}), **scored[i], "fluency": flu[i]}
    return {"per_edit": rows, "seconds": sum(seconds), "batch_seconds": seconds, "target_accuracy": accuracies,
            "curve": curve}


def mode_of(hp) -> str:
    from .algorithms import get_algorithm

    return get_algorithm(hp.alg_name).mode


def _mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize_ci(rows, n_boot, seed) -> Dict[str, tuple]:
    return {k: bootstrap([r.get(k) for r in rows], n_boot, seed) for k, _ in METRICS}


def run_comparison(model, tok, records, hparams_by_alg: Dict[str, object], cfg: CompareConfig, stats_dir=None) -> Dict:
    """Run every algorithm in ``hparams_by_alg`` (base name -> hparams) in every mode."""
    from tqdm.auto import tqdm

    baseline = evaluate_records(model, tok, records)
    base_flu = _fluency(model, tok, records, cfg.fluency_tokens) if cfg.fluency else [None] * len(records)
    for row, f in zip(baseline, base_flu):
        row["fluency"] = f
    results = {"n": len(records), "config": cfg.__dict__.copy(), "unedited": {
        "per_edit": baseline, "summary": summarize_ci(baseline, cfg.n_boot, cfg.seed)}, "runs": {}}
    total = len(hparams_by_alg) * len(cfg.modes) * len(records)
    bar = tqdm(total=total, desc="editing", unit="edit", disable=not cfg.progress)
    anchors: dict = {} if cfg.share_anchors else None
    for base, hp0 in hparams_by_alg.items():
        if stats_dir:
            hp0.stats_dir = stats_dir
        modules = [t.format(l) for l in hp0.layers for t in hp0.rewrite_templates()]
        second_moments(model, tok, hp0, modules, progress=cfg.progress)
        templates = resolve_templates(model, tok, hp0)
        for mode in cfg.modes:
            hp = type(hp0).from_dict({**hp0.to_dict(), "alg_name": f"{base}_{mode.upper()}"})
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


def table_rows(results) -> List[List[str]]:
    header = ["algorithm", "mode"] + [h for _, h in METRICS] + ["edit time s"]
    rows = [header, ["-", "unedited"] + [_cell(results["unedited"]["summary"][k]) for k, _ in METRICS] + ["-"]]
    for key, run in results["runs"].items():
        base, mode = key.split("/")
        rows.append([base, mode] + [_cell(run["summary"][k]) for k, _ in METRICS] + [f"{run['seconds']:.1f}"])
    return rows


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
        for mode, style in (("spread", "o--"), ("replay", "s-")):
            run = results["runs"].get(f"{alg}/{mode}")
            if not run or not run["target_accuracy"]:
                continue
            layers = run["layers"]
            per_layer = torch.tensor([[s["mean_by_layer"] for s in b["sites"]] for b in run["target_accuracy"]])
            ax.plot(layers, per_layer.mean(dim=(0, 1)).tolist(), style, label=mode)
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


def plot_sequential(results, path: Path) -> Optional[Path]:
    """Efficacy, generalization and specificity of all edits so far vs number of edits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: r for k, r in results["runs"].items() if r["curve"]}
    if not runs:
        return None
    keys = [("efficacy_acc", "efficacy"), ("generalization_acc", "generalization"), ("specificity", "specificity")]
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
    plots = {"target_error": plot_target_error(results, out / "target_error.png"),
             "sequential": plot_sequential(results, out / "sequential.png")}
    lines = [f"# {title}", "", render_markdown(table_rows(results)), "",
             "Cells: mean over edits [95% bootstrap interval]. target error: mean over edit layers of "
             "|h - target| / |target| after the edit (see easyedit_replay/diagnostics.py).", ""]
    for name, p in plots.items():
        if p:
            files[name] = p
            lines += [f"![{name}]({p.name})", ""]
    files["report"] = out / "report.md"
    files["report"].write_text("\n".join(lines))
    return files
