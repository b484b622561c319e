"""MEMIT_REPLAY vs EasyEdit's MEMIT-FE: edit time, cold and warm, side by side in one run.

Both apply functions are called directly with all requests in one call, on the same
model, requests (the first N CounterFact records whose prompt contains the subject),
hyperparameters (hparams/MEMIT_REPLAY/smollm2-135m.yaml), context templates and
covariance statistics (the host's ``COV_CACHE`` is filled with the plugin's second
moments, so neither side spends time on statistics). Every call starts from the
unedited weights.

  cold  MEMIT-FE: ``apply_memit_FE_to_model(..., cache_template=<empty dir>)`` (it writes
        its per-case z files); ours: ``apply_memit_replay_to_model`` with an empty anchor cache.
  warm  the same calls again: MEMIT-FE reads every z from its ``cache_template`` files,
        ours every anchor from the anchor cache. (EasyEdit's ``BaseEditor`` passes no
        ``cache_template``, so through the editor every MEMIT-FE run is a cold run.)

Also printed: the largest relative difference between the two anchors (MEMIT-FE's z at
``l_1`` from its cache file vs our ``init + delta``) and between the per-layer updates.

Runs in EasyEdit's interpreter with the plugin importable, from the repository root:

    EASYEDIT_ROOT=/path/to/EasyEdit PYTHONPATH=$PWD OMP_NUM_THREADS=1 \\
        /path/to/easyedit-venv/bin/python benchmarks/bench_memit_fe.py --sizes 8,32
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"


def counterfact_requests(path: Path, n: int) -> list:
    """The first ``n`` records whose prompt contains the subject, as EasyEdit requests."""
    records = [r for r in json.loads(path.read_text()) if r["subject"] in r["prompt"]][:n]
    if len(records) < n:
        raise SystemExit(f"{path} has only {len(records)} usable records; asked for {n}")
    return [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
             "ground_truth": r["ground_truth"], "case_id": r["case_id"]} for r in records]


def timed(fn):
    """(seconds, result) of ``fn()``, its printing swallowed (MEMIT-FE prints every step)."""
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        out = fn()
    return time.perf_counter() - start, out


def edit_updates(model, apply, names):
    """Run ``apply(model)`` (an apply_* call returning (model, weights_copy)), return its
    seconds, ``{name: W_after - W_before}`` and the weights_copy, and restore the weights."""
    seconds, (_, orig) = timed(apply)
    with torch.no_grad():
        upd = {n: model.get_parameter(n).detach().double() - orig[n].double() for n in names}
        for n in names:
            model.get_parameter(n).copy_(orig[n])
    return seconds, upd, orig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8,32", help="comma-separated numbers of edits")
    p.add_argument("--steps", type=int, help="anchor steps (default: the YAML's v_num_grad_steps)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", help="also write the results as JSON")
    args = p.parse_args()
    root = os.environ.get("EASYEDIT_ROOT") or sys.exit("set EASYEDIT_ROOT to an EasyEdit checkout with MEMIT-FE")
    work = Path(tempfile.mkdtemp(prefix="bench_memit_fe_"))
    os.environ["EASYEDIT_REPLAY_ANCHOR_CACHE"] = str(work / "anchors")  # empty: the first call is cold

    from easyedit_replay import apply_memit_replay_to_model
    from easyedit_replay.algorithms import load_hparams
    from easyedit_replay.editor import resolve_templates
    from easyedit_replay.models import cache_root, load_model
    from easyedit_replay.stats import second_moments
    from tests.helpers.easyedit_stock import import_stock

    fe = import_stock(root, "memit_FE.memit_FE_main")
    hp = load_hparams(ROOT / "hparams" / "MEMIT_REPLAY" / "smollm2-135m.yaml", stats_dir=str(cache_root() / "stats"))
    if args.steps:
        hp = hp.replace(v_num_grad_steps=args.steps)
    model, tok = load_model(hp.model_name)  # right padding, as BaseEditor sets for MEMIT
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    templates = resolve_templates(model, tok, hp)
    modules = [hp.rewrite_module_tmp.format(l) for l in hp.layers]
    names = [m + ".weight" for m in modules]
    covs = second_moments(model, tok, hp, modules)
    fe.CONTEXT_TEMPLATES_CACHE = templates
    for m in modules:
        fe.COV_CACHE[(model.config._name_or_path.replace("/", "_"), m)] = covs[m].float()
    fields = fe.MEMITFEHyperParams.__dataclass_fields__
    fe_hp = fe.MEMITFEHyperParams(**{k: v for k, v in hp.to_dict().items() if k in fields}
                                  | {"alg_name": "MEMIT-FE", "device": "cpu"})
    l1 = hp.layers[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; SmolLM2-135M float32, layers {hp.layers}, "
          f"{hp.v_num_grad_steps} anchor steps, {len(templates[0]) + len(templates[1])} context templates")
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        requests = counterfact_requests(Path(args.data), n)
        z_cache = str(work / f"fe_z_{n}" / "{}_{}_{}.npz")
        row = {"n": n}
        for phase in ("cold", "warm"):
            row[f"fe_{phase}"], fe_upd, _ = edit_updates(model, lambda: fe.apply_memit_FE_to_model(
                model, tok, requests, fe_hp, return_orig_weights=True, cache_template=z_cache), names)
            row[f"ours_{phase}"], our_upd, our_copy = edit_updates(model, lambda: apply_memit_replay_to_model(
                model, tok, requests, hp, return_orig_weights=True, context_templates=templates), names)
            row[f"ratio_{phase}"] = row[f"fe_{phase}"] / row[f"ours_{phase}"]
        ours_z = our_copy.plan.anchors[l1].value[0].double()  # [R, d]
        fe_z = torch.stack([torch.from_numpy(np.load(z_cache.format(l1, hp.clamp_norm_factor, r["case_id"]))["v_star"])
                            for r in requests]).double()
        row["anchor_rel_diff"] = float(((ours_z - fe_z).norm(dim=-1) / fe_z.norm(dim=-1)).max())
        row["update_rel_diff"] = {n_: float((our_upd[n_] - fe_upd[n_]).norm() / fe_upd[n_].norm()) for n_ in names}
        rows.append(row)
        print(f"\n{n} edits, one call: MEMIT-FE cold {row['fe_cold']:.1f} s, MEMIT_REPLAY cold {row['ours_cold']:.1f} s "
              f"(MEMIT-FE / MEMIT_REPLAY = {row['ratio_cold']:.2f}x); warm {row['fe_warm']:.1f} s vs "
              f"{row['ours_warm']:.1f} s ({row['ratio_warm']:.2f}x)")
        print(f"  largest relative anchor difference (z at layer {l1}, over requests): {row['anchor_rel_diff']:.2e}; "
              f"updates per layer: " + ", ".join(f"{v:.1e}" for v in row["update_rel_diff"].values()))
        sys.stdout.flush()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
