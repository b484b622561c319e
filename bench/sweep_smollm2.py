"""Hyperparameter sweep used to choose hparams/MEMIT_REPLAY/smollm2-135m.yaml.

For every window of 5 consecutive edit layers and every mom2_update_weight, edit
the same requests with spread and with replay (one batch edit each) and print
efficacy, generalization and specificity. Anchors depend only on the mode's
anchor layer, so each is optimized once and reused across windows/weights.

    python bench/sweep_smollm2.py --n 12 --windows 1-5,2-6,3-7,4-8,6-10 --weights 1000,5000,15000
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from easyedit_replay.anchor import optimize_anchors
from easyedit_replay.cli import default_hparams_path
from easyedit_replay.data import load_records
from easyedit_replay.editor import compute_edit, resolve_templates, weight_transaction
from easyedit_replay.evaluate import evaluate_records, summarize
from easyedit_replay.algorithms import alg_name_of, load_hparams
from easyedit_replay.keys import prepare_requests
from easyedit_replay.models import cache_root, load_model
from easyedit_replay.stats import second_moments
from easyedit_replay.targets import anchor_layer
from easyedit_replay.tracing import resolve_parameter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--data")
    p.add_argument("--windows", default="1-5,2-6,3-7,4-8,6-10")
    p.add_argument("--weights", default="1000,5000,15000")
    p.add_argument("--clamp", type=float)
    p.add_argument("--json")
    args = p.parse_args(argv)

    base = load_hparams(default_hparams_path(), stats_dir=str(cache_root() / "stats"))
    if args.clamp:
        base = base.replace(clamp_norm_factor=args.clamp)
    model, tok = load_model(base.model_name)
    records = load_records(args.data, args.n)
    reqs = prepare_requests(records)
    windows = [list(range(int(a), int(b) + 1)) for a, b in (w.split("-") for w in args.windows.split(","))]
    weights = [float(w) for w in args.weights.split(",")]
    all_layers = sorted({l for w in windows for l in w})
    second_moments(model, tok, base, [base.rewrite_module_tmp.format(l) for l in all_layers])
    templates = resolve_templates(model, tok, base)
    baseline = evaluate_records(model, tok, records)
    print("unedited", json.dumps(summarize(baseline)), flush=True)
    anchors = {}
    rows = []
    for layers in windows:
        names = [f"{base.rewrite_module_tmp.format(l)}.weight" for l in layers]
        params = {n: resolve_parameter(model, n) for n in names}
        for mode in ("spread", "replay"):
            hp0 = base.replace(layers=layers, alg_name=alg_name_of("MEMIT", mode))
            at = anchor_layer(mode, layers)
            if (mode, at) not in anchors:
                t = time.perf_counter()
                anchors[(mode, at)] = optimize_anchors(model, tok, reqs, hp0, at, [hp0.layer_module_tmp], templates)
                print(f"anchor {mode}@{at}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
            for weight in weights:
                hp = hp0.replace(mom2_update_weight=weight)
                plan = compute_edit(model, tok, records, hp, context_templates=templates, anchor=anchors[(mode, at)])
                with weight_transaction(params, restore_always=True):
                    with torch.no_grad():
                        for name, upd in plan.updates.items():
                            params[name] += upd.to(params[name].dtype)
                    s = summarize(evaluate_records(model, tok, records, baseline))
                row = {"layers": f"{layers[0]}-{layers[-1]}", "weight": weight, "mode": mode, **s}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(f"{'layers':7} {'weight':>7} {'mode':7} {'eff acc':>8} {'eff win':>8} {'gen acc':>8} {'gen win':>8} {'spec':>6}")
    for r in rows:
        print(f"{r['layers']:7} {r['weight']:7.0f} {r['mode']:7} {r['efficacy_acc']:8.3f} {r['efficacy_win']:8.3f} "
              f"{r['generalization_acc']:8.3f} {r['generalization_win']:8.3f} {r['specificity']:6.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
