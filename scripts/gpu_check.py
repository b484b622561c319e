"""One-GPU check: SmolLM2-135M on CUDA in bf16 with MEMIT, PMET, EMMET and AlphaEdit, spread and replay.

For each algorithm and construction the bundled demo edits (``--n``, one batch) are
edited from the same original weights, evaluated and undone. Printed per row:
efficacy / generalization / specificity (EasyEdit's token accuracies), the
agreement of the per-layer weight updates with the same edit of a float32 copy
of the model (min cosine over the edited weights, and the max difference relative
to the edit's largest float32 layer update; ``--reference none`` skips it), and the per-phase times in seconds:

  statistics  second moments (read from the cache after the first algorithm)
  anchors     anchor optimization (the anchor cache is off)
  targets     target construction (replay: the replay forward pass)
  layers      the rest of ``compute_edit``: keys, residuals, solves, writes
  evaluate    the metrics of the edited model

``--dispatch`` also edits a copy dispatched with accelerate (layers 22-29
offloaded to the CPU, executed on the GPU) and reports its agreement with the
plain model's updates.

    python scripts/gpu_check.py                        # CUDA, bf16, 8 edits, the YAMLs' 25 anchor steps
    python scripts/gpu_check.py --out benchmarks/results/gpu_check_cuda.txt --dispatch
    python scripts/gpu_check.py --device cpu --n 1 --steps 1 --algs MEMIT   # the same path on the CPU

Without a CUDA device (and ``--device`` left at ``cuda``) it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

EXIT_NO_CUDA = 2
PHASES = ("statistics", "anchors", "targets", "layers", "evaluate")
ALGS = ("MEMIT", "PMET", "EMMET", "AlphaEdit")


def no_cuda_message(torch) -> Optional[str]:
    """Why this check cannot run on CUDA here (None when it can)."""
    if torch.cuda.is_available():
        return None
    build = torch.version.cuda or "none (a CPU-only build)"
    return (f"scripts/gpu_check.py needs a CUDA device, and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}, CUDA build: {build}). Run it on a machine with an NVIDIA GPU and a "
            f"CUDA build of torch, or pass --device cpu to run the same check on the CPU (slow).")


class PhaseTimer:
    """Seconds spent in the editor's stages, by wrapping the functions ``compute_edit`` calls
    (a stage the editor no longer calls by that name is reported as part of ``layers``)."""

    WRAPPED = {"statistics": "second_moments", "anchors": "optimize_anchors", "targets": "build_targets"}

    def __init__(self, sync):
        self.sync = sync
        self.seconds: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start

    @contextlib.contextmanager
    def editor_stages(self):
        from easyedit_replay import editor

        saved = {}
        for phase, attr in self.WRAPPED.items():
            if hasattr(editor, attr):
                saved[attr] = getattr(editor, attr)
                setattr(editor, attr, self._timed(phase, saved[attr]))
        try:
            yield
        finally:
            for attr, fn in saved.items():
                setattr(editor, attr, fn)

    def _timed(self, phase, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with self.phase(phase):
                return fn(*args, **kwargs)

        return run


def dispatched_copy(model, device: str, offload_from: int = 22):
    """``model`` deep-copied and dispatched with accelerate: layers ``offload_from``.. offloaded
    to the CPU (executed on ``device``), the rest on ``device``."""
    from accelerate import dispatch_model

    n = len(model.model.layers)
    device_map = {"model.embed_tokens": device, "model.norm": device, "model.rotary_emb": device, "lm_head": device,
                  **{f"model.layers.{i}": device if i < offload_from else "cpu" for i in range(n)}}
    return dispatch_model(copy.deepcopy(model), device_map=device_map, main_device=device)


def run(args) -> List[dict]:
    import torch

    from easyedit_replay.algorithms import load_hparams, weight_names
    from easyedit_replay.algorithms.alphaedit import reset_alphaedit_cache
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.data import load_records
    from easyedit_replay.diagnostics import update_agreement
    from easyedit_replay.editor import apply_plan, compute_edit, resolve_templates, weight_transaction
    from easyedit_replay.evaluate import evaluate_records
    from easyedit_replay.models import cache_root, load_model
    from easyedit_replay.tracing import resolve_parameter

    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    dtype = getattr(torch, args.dtype)
    timer = PhaseTimer(sync)
    with timer.phase("load"):
        model, tok = load_model(device=dev, dtype=dtype)
    reference = None if args.reference == "none" else load_model(device=dev, dtype=getattr(torch, args.reference))[0]
    dispatched = dispatched_copy(model, dev) if args.dispatch else None
    records = load_records()[: args.n]
    stats_dir = args.stats_dir or str(cache_root() / "stats")
    rows = []
    with timer.phase("evaluate"):
        baseline = evaluate_records(model, tok, records)
    for alg in args.algs.split(","):
        overrides = dict(stats_dir=stats_dir, anchor_cache=False)
        if args.steps:
            overrides["v_num_grad_steps"] = args.steps
        base = load_hparams(default_hparams_path(alg=f"{alg}_REPLAY"), **overrides)
        templates = resolve_templates(model, tok, base)
        for mode in args.modes.split(","):
            hp = base.replace(alg_name=f"{alg}_{mode.upper()}")
            timer.seconds.clear()
            params = {n: resolve_parameter(model, n) for n in weight_names(hp)}
            with weight_transaction(params, restore_always=True):
                with timer.editor_stages(), timer.phase("edit"):
                    plan = compute_edit(model, tok, records, hp, mode, context_templates=templates)
                apply_plan(model, plan, hp)
                with timer.phase("evaluate"):
                    scored = evaluate_records(model, tok, records, baseline).rows
            reset_alphaedit_cache(model)
            seconds = dict(timer.seconds)
            seconds["layers"] = seconds.pop("edit") - sum(seconds.get(p, 0.0) for p in ("statistics", "anchors", "targets"))
            row = {"alg": alg, "mode": mode, "dtype": args.dtype, "device": dev, "edits": len(records),
                   **{k: sum(r[k] for r in scored if r[k] is not None) / max(1, sum(r[k] is not None for r in scored))
                      for k in ("efficacy_acc", "generalization_acc", "specificity")},
                   "seconds": {p: round(seconds.get(p, 0.0), 2) for p in PHASES}}
            for label, other in (("reference", reference), ("dispatched", dispatched)):
                if other is None:
                    continue
                other_plan = compute_edit(other, tok, records, hp, mode, context_templates=templates)
                reset_alphaedit_cache(other)
                agree = update_agreement(plan.updates, other_plan.updates)
                row[label] = {"min_cosine": min(a["cosine"] for a in agree.values()),
                              "max_rel_diff": max(a["rel_diff"] for a in agree.values()),
                              "max_rel_to_largest": max(a["rel_to_largest"] for a in agree.values()),
                              "per_weight": {n: {k: round(v, 4) for k, v in a.items()} for n, a in agree.items()}}
            rows.append(row)
            print(render([row], header=not rows[:-1]), flush=True)
    return rows


def render(rows: List[dict], header: bool = True) -> str:
    cols = ["alg", "mode", "eff", "gen", "spec", "cos vs ref", "rel vs ref", "cos disp"] + list(PHASES)
    lines = []
    if header:
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ref, disp = r.get("reference"), r.get("dispatched")
        cells = [r["alg"], r["mode"], f"{r['efficacy_acc']:.2f}", f"{r['generalization_acc']:.2f}",
                 f"{r['specificity']:.2f}" if r["specificity"] is not None else "-",
                 f"{ref['min_cosine']:.3f}" if ref else "-", f"{ref['max_rel_to_largest']:.3f}" if ref else "-",
                 f"{disp['min_cosine']:.5f}" if disp else "-"] + [f"{r['seconds'][p]:.2f}" for p in PHASES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reference", default="float32", choices=["float32", "float64", "none"],
                   help="weight dtype of the copy whose updates the rows are compared with")
    p.add_argument("--n", type=int, default=8, help="bundled demo edits, one batch")
    p.add_argument("--steps", type=int, default=None, help="anchor steps (default: the YAML's)")
    p.add_argument("--algs", default=",".join(ALGS))
    p.add_argument("--modes", default="spread,replay")
    p.add_argument("--dispatch", action="store_true", help="also edit an accelerate-dispatched copy")
    p.add_argument("--stats-dir", default=None)
    p.add_argument("--out", default=None, help="write the table and the JSON rows here")
    args = p.parse_args(argv)
    import torch

    if args.device.startswith("cuda"):
        why = no_cuda_message(torch)
        if why:
            print(why, file=sys.stderr)
            return EXIT_NO_CUDA
    started = time.perf_counter()
    rows = run(args)
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    text = (f"# scripts/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
            f"# {gpu}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s in all\n\n" + render(rows) + "\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
