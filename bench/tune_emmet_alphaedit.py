"""Short sweep used to choose hparams/EMMET_REPLAY and hparams/AlphaEdit_REPLAY for SmolLM2.

Edits the first ``--n`` demo edits in one batch with spread and with replay, for
every combination of the update-rule settings in ``--grid``, and prints efficacy,
generalization and specificity. The anchors depend only on the mode's anchor
layer (the objective is the same for both algorithms), so each is optimized once.

    python bench/tune_emmet_alphaedit.py --n 8 --run "EMMET:mom2_update_weight=1000,5000,15000"
    python bench/tune_emmet_alphaedit.py --n 8 --run "EMMET:mom2_update_weight=15000,50000" \
        --run "AlphaEdit:nullspace_threshold=1e-2,2e-2;L2=1,10"
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from easyedit_replay.anchor import optimize_anchors
from easyedit_replay.data import load_records
from easyedit_replay.editor import compute_edit, resolve_templates, weight_transaction
from easyedit_replay.evaluate import evaluate_records, summarize
from easyedit_replay.algorithms import alg_name_of, load_hparams
from easyedit_replay.keys import prepare_requests
from easyedit_replay.models import cache_root, load_model
from easyedit_replay.targets import anchor_layer
from easyedit_replay.tracing import resolve_parameter

ROOT = Path(__file__).resolve().parents[1]


def parse_grid(text):
    axes = []
    for part in filter(None, text.split(";")):
        name, values = part.split("=")
        axes.append([(name.strip(), float(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--run", action="append", required=True,
                   help="ALG:field=v1,v2;field2=v1,... (ALG is EMMET or AlphaEdit); repeatable, anchors are shared")
    p.add_argument("--steps", type=int, help="override v_num_grad_steps")
    args = p.parse_args(argv)

    runs = [(r.split(":", 1)[0], parse_grid(r.split(":", 1)[1])) for r in args.run]
    bases = {}
    for alg, _ in runs:
        bases[alg] = load_hparams(ROOT / "hparams" / f"{alg}_REPLAY" / "smollm2-135m.yaml", stats_dir=str(cache_root() / "stats"),
                                  **({"v_num_grad_steps": args.steps} if args.steps else {}))
    base = bases[runs[0][0]]
    model, tok = load_model(base.model_name)
    records = load_records(None, args.n)
    reqs = prepare_requests(records)
    templates = resolve_templates(model, tok, base)
    baseline = evaluate_records(model, tok, records)
    names = [f"{base.rewrite_module_tmp.format(l)}.weight" for l in base.layers]
    params = {n: resolve_parameter(model, n) for n in names}
    rows = []
    for mode in ("spread", "replay"):
        t = time.perf_counter()
        anchor = optimize_anchors(model, tok, reqs, base, anchor_layer(mode, base.layers), [base.layer_module_tmp], templates)
        print(f"anchor {mode}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        for alg, grid in runs:
            for setting in grid:
                hp = bases[alg].replace(alg_name=alg_name_of(alg, mode), **setting)
                plan = compute_edit(model, tok, records, hp, context_templates=templates, anchor=anchor)
                with weight_transaction(params, restore_always=True):
                    with torch.no_grad():
                        for name, upd in plan.updates.items():
                            params[name] += upd.to(params[name].dtype)
                    s = summarize(evaluate_records(model, tok, records, baseline))
                row = {"alg": alg, "mode": mode, "setting": setting, **s,
                       "upd_norm": sum(r.update_norm for r in plan.records)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(f"{'alg':9} {'setting':45} {'mode':7} {'eff acc':>8} {'eff win':>8} {'gen acc':>8} {'gen win':>8} {'spec':>6} {'sum|dW|':>8}")
    for r in rows:
        setting = ", ".join(f"{k}={v:g}" for k, v in r["setting"].items())
        print(f"{r['alg']:9} {setting:45} {r['mode']:7} {r['efficacy_acc']:8.3f} {r['efficacy_win']:8.3f} "
              f"{r['generalization_acc']:8.3f} {r['generalization_win']:8.3f} {r['specificity']:6.3f} {r['upd_norm']:8.2f}")

if __name__ == "__main__":
    main()
