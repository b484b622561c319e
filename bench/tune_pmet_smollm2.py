"""Short sweep used to choose hparams/PMET_REPLAY/smollm2-135m.yaml.

For every anchor setting (``clamp_norm_factor``/``v_weight_decay``) and mode the
anchors are optimized once; every ``mom2_update_weight`` reuses them. Each
configuration is one batch edit of the first ``--n`` demo edits; the printed
metrics are those of :func:`easyedit_replay.evaluate.summarize` (specificity is
against the unedited model).

    python bench/tune_pmet_smollm2.py --n 8 --anchors 4:1e-3,1:0.5 --weights 1000,5000,15000
    python bench/tune_pmet_smollm2.py --n 8 --anchors 1:0.5 --weights 100,300,1000 --modes spread,replay,replay-full
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from easyedit_replay.cli import default_hparams_path
from easyedit_replay.data import load_records
from easyedit_replay.editor import compute_edit
from easyedit_replay.evaluate import evaluate_records, summarize
from easyedit_replay.algorithms import alg_name_of, load_hparams
from easyedit_replay.models import cache_root, load_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--anchors", default="4:1e-3,1:0.5", help="clamp_norm_factor:v_weight_decay pairs")
    p.add_argument("--weights", default="1000,5000,15000")
    p.add_argument("--layers", default="4,5,6,7,8")
    p.add_argument("--modes", default="spread,replay", help="spread, replay, replay-full (replay_share: full)")
    args = p.parse_args(argv)

    stats_dir = str(cache_root() / "stats")
    base = load_hparams(default_hparams_path(alg="PMET_REPLAY"), stats_dir=stats_dir,
                        layers=[int(x) for x in args.layers.split(",")])
    model, tok = load_model(base.model_name)
    records = load_records(None, args.n)
    baseline = evaluate_records(model, tok, records)
    print("unedited", json.dumps(summarize(baseline)), flush=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for spec in args.anchors.split(","):
        clamp, wd = (float(x) for x in spec.split(":"))
        anchors = {}  # per mode: the anchor does not depend on the weight or the share
        for variant in args.modes.split(","):
            mode, _, share = variant.partition("-")
            for weight in (float(w) for w in args.weights.split(",")):
                hp = base.replace(alg_name=alg_name_of("PMET", mode), clamp_norm_factor=clamp,
                                  replay_share=share or "remaining", v_weight_decay=wd, mom2_update_weight=weight)
                start = time.perf_counter()
                plan = compute_edit(model, tok, records, hp, stats_dir=stats_dir, anchor=anchors.get(mode))
                anchors[mode] = plan.anchor
                try:
                    with torch.no_grad():
                        for name, upd in plan.updates.items():
                            model.get_parameter(name)[...] += upd.to(torch.float32)
                    summary = summarize(evaluate_records(model, tok, records, baseline))
                finally:
                    with torch.no_grad():
                        for n, prm in model.named_parameters():
                            prm.copy_(before[n])
                row = {"clamp": clamp, "wd": wd, "weight": weight, "mode": variant, **summary,
                       "seconds": round(time.perf_counter() - start, 1)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
