"""Side-by-side benchmarks of easyedit-replay (not part of the test run).

Each variant runs in its own subprocess (so its peak memory, ``ru_maxrss``, is its
own) on the same inputs; the parent prints ratios measured in this one run:

  edit     replay vs spread edit time (same algorithm, same requests, same
           statistics and context templates), total and per anchor step
  anchors  batched vs per-request anchor optimization for N requests: speedup and
           the max difference of the resulting anchors
  stats    one-pass statistics for 5 edit layers vs one pass per layer (stopping
           after the layer) vs one full forward pass per layer (EasyEdit's way)
  stock    (with EASYEDIT_ROOT) EasyEdit's stock MEMIT vs our MEMIT_SPREAD

    python benchmarks/bench_editing.py --parts edit,anchors,stats --sizes 1,8,32,128 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _setup(args):
    import torch

    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.data import load_records
    from easyedit_replay.editor import resolve_templates
    from easyedit_replay.algorithms import load_hparams
    from easyedit_replay.models import cache_root, load_model

    torch.manual_seed(0)
    # anchor_cache off: every variant optimizes its anchors (timings and the batched vs
    # per-request comparison would otherwise read anchors written by an earlier variant)
    hp = load_hparams(args.hparams or default_hparams_path(), stats_dir=str(cache_root() / "stats"), anchor_cache=False)
    if args.steps:
        hp = hp.replace(v_num_grad_steps=args.steps)
    model, tok = load_model(hp.model_name)
    records = load_records(args.data)
    while len(records) < args.n:  # cycle the demo set when more requests are asked for
        records = records + records
    records = records[: args.n]
    templates = resolve_templates(model, tok, hp)
    return hp, model, tok, records, templates


# ----------------------------------------------------------------------------- child parts


def child_edit(args):
    from easyedit_replay.algorithms import alg_name_of, get_algorithm
    from easyedit_replay.editor import compute_edit
    from easyedit_replay.stats import second_moments

    hp, model, tok, records, templates = _setup(args)
    second_moments(model, tok, hp, [hp.rewrite_module_tmp.format(l) for l in hp.layers], progress=False)
    hp = hp.replace(alg_name=alg_name_of(get_algorithm(hp.alg_name).base, args.mode))
    start = time.perf_counter()
    plan = compute_edit(model, tok, records, hp, args.mode, context_templates=templates)
    seconds = time.perf_counter() - start
    steps = int(plan.anchor.steps.max())
    return {"seconds": seconds, "anchor_steps_max": steps, "anchor_steps_sum": int(plan.anchor.steps.sum())}


def child_anchors(args):
    import torch

    from easyedit_replay.anchors import Objective, optimize_anchors
    from easyedit_replay.prompts import prepare_requests
    from easyedit_replay.targets import anchor_layer

    hp, model, tok, records, templates = _setup(args)
    reqs = prepare_requests(records)
    hp = hp.replace(anchor_batch_size=args.chunk)
    layer = anchor_layer("replay", hp.layers)
    start = time.perf_counter()
    res = optimize_anchors(model, tok, reqs, Objective.of(hp, layer, [hp.layer_module_tmp], templates),
                           chunk_size=hp.anchor_batch_size, cache=hp.anchor_cache)
    seconds = time.perf_counter() - start
    torch.save(res.delta, args.out)
    return {"seconds": seconds, "steps_sum": int(res.steps.sum())}


def child_stats(args):
    from easyedit_replay.stats import bundled_texts, collect_second_moments, sample_indices
    from easyedit_replay.tracing import Trace

    hp, model, tok, _, _ = _setup(args)
    texts = bundled_texts()
    texts = [texts[i] for i in sample_indices(len(texts), args.texts)]
    modules = [hp.rewrite_module_tmp.format(l) for l in hp.layers]
    start = time.perf_counter()
    if args.variant == "one-pass":
        collect_second_moments(model, tok, texts, modules, maxlen=512, progress=False)
    elif args.variant == "per-layer":
        for m in modules:
            collect_second_moments(model, tok, texts, [m], maxlen=512, progress=False)
    else:  # per-layer, full forward pass (no early stop), as EasyEdit's layer_stats does
        original = Trace.__init__

        def no_stop(self, *a, **k):
            k["stop_when_done"] = False
            original(self, *a, **k)

        Trace.__init__ = no_stop
        for m in modules:
            collect_second_moments(model, tok, texts, [m], maxlen=512, progress=False)
        Trace.__init__ = original
    return {"seconds": time.perf_counter() - start, "texts": len(texts), "modules": len(modules)}


def child_stock(args):
    """EasyEdit's stock MEMIT vs our MEMIT_SPREAD on the same edits, templates and statistics."""
    import copy

    import torch

    from easyedit_replay.easyedit import seed_stock_caches
    from easyedit_replay.editor import apply_edit

    hp, model, tok, records, templates = _setup(args)
    sys.path.insert(0, os.environ["EASYEDIT_ROOT"])
    from easyeditor.models.memit import memit_main  # noqa: E402
    from easyeditor.models.memit.memit_hparams import MEMITHyperParams as StockHP  # noqa: E402

    modules = [hp.rewrite_module_tmp.format(l) for l in hp.layers]
    seed_stock_caches(memit_main, model, tok, hp, templates)
    stock_hp = StockHP(**{k: v for k, v in hp.to_dict().items() if k in StockHP.__dataclass_fields__} | {"alg_name": "MEMIT", "device": "cpu"})
    ours_hp = hp.replace(alg_name="MEMIT_SPREAD")
    if args.variant == "stock":
        m2 = copy.deepcopy(model)
        start = time.perf_counter()
        memit_main.apply_memit_to_model(m2, tok, copy.deepcopy(records), stock_hp)
    else:
        m2 = copy.deepcopy(model)
        start = time.perf_counter()
        apply_edit(m2, tok, records, ours_hp, context_templates=templates)
    seconds = time.perf_counter() - start
    torch.save({m: m2.get_parameter(m + ".weight").detach() for m in modules}, args.out)
    return {"seconds": seconds}


CHILDREN = {"edit": child_edit, "anchors": child_anchors, "stats": child_stats, "stock": child_stock}


# ----------------------------------------------------------------------------- parent


def run_child(part, **kw):
    argv = [sys.executable, str(HERE), "--child", part]
    for k, v in kw.items():
        if v is not None:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"benchmark child {part} {kw} failed")
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def parent(args):
    import platform

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    common = dict(hparams=args.hparams, data=args.data, steps=args.steps)
    parts = args.parts.split(",")
    if "edit" in parts:
        res = {}
        for rep in range(args.repeats):
            for mode in ("spread", "replay"):
                r = run_child("edit", mode=mode, n=args.n, **common)
                res.setdefault(mode, []).append(r)
        best = {m: min(r["seconds"] for r in rs) for m, rs in res.items()}
        per_step = {m: min(r["seconds"] / max(1, r["anchor_steps_sum"]) for r in rs) for m, rs in res.items()}
        print(f"\n[edit] MEMIT, {args.n} requests, best of {args.repeats}")
        for m in ("spread", "replay"):
            r = res[m][0]
            print(f"  {m:7} {best[m]:8.1f} s   anchor steps (sum over requests) {r['anchor_steps_sum']:5d}   "
                  f"peak {max(x['peak_mib'] for x in res[m]):7.0f} MiB")
        print(f"  replay / spread edit time: {best['replay'] / best['spread']:.3f}x; per request-step: "
              f"{per_step['replay'] / per_step['spread']:.3f}x")
    if "anchors" in parts:
        import torch

        print(f"\n[anchors] replay anchor (layer {args.anchor_layer_note}), {args.steps or 'YAML'} steps")
        print(f"  {'requests':>8} {'batched s':>10} {'per-request s':>14} {'speedup':>8} {'max |diff|':>11} {'rel':>9} "
              f"{'peak batched':>13} {'peak single':>12}")
        for n in [int(x) for x in args.sizes.split(",")]:
            out_b, out_s = f"/tmp/bench_anchor_b{n}.pt", f"/tmp/bench_anchor_s{n}.pt"
            b = run_child("anchors", n=n, chunk=args.chunk, out=out_b, **common)
            s = run_child("anchors", n=n, chunk=1, out=out_s, **common)
            db, ds = torch.load(out_b), torch.load(out_s)
            diff = float((db - ds).abs().max())
            rel = diff / float(ds.abs().max())
            print(f"  {n:8d} {b['seconds']:10.1f} {s['seconds']:14.1f} {s['seconds'] / b['seconds']:7.2f}x "
                  f"{diff:11.2e} {rel:9.2e} {b['peak_mib']:10.0f} MiB {s['peak_mib']:9.0f} MiB")
    if "stats" in parts:
        res = {v: run_child("stats", variant=v, texts=args.texts, **common) for v in ("one-pass", "per-layer", "per-layer-full")}
        print(f"\n[stats] second moments of 5 edit layers over {res['one-pass']['texts']} bundled texts")
        for v, r in res.items():
            print(f"  {v:15} {r['seconds']:7.1f} s  peak {r['peak_mib']:6.0f} MiB")
        print(f"  per-layer / one-pass: {res['per-layer']['seconds'] / res['one-pass']['seconds']:.2f}x; "
              f"per-layer full forward (EasyEdit) / one-pass: {res['per-layer-full']['seconds'] / res['one-pass']['seconds']:.2f}x")
    if "stock" in parts:
        if not os.environ.get("EASYEDIT_ROOT"):
            print("\n[stock] skipped: set EASYEDIT_ROOT to an EasyEdit checkout")
        else:
            import torch

            st = run_child("stock", variant="stock", n=args.n, out="/tmp/bench_stock.pt", **common)
            ours = run_child("stock", variant="ours", n=args.n, out="/tmp/bench_ours.pt", **common)
            a, b = torch.load("/tmp/bench_stock.pt"), torch.load("/tmp/bench_ours.pt")
            rel = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)
            print(f"\n[stock] MEMIT, {args.n} requests: EasyEdit {st['seconds']:.1f} s ({st['peak_mib']:.0f} MiB), "
                  f"ours {ours['seconds']:.1f} s ({ours['peak_mib']:.0f} MiB): {st['seconds'] / ours['seconds']:.2f}x faster; "
                  f"max relative weight difference {rel:.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child")
    p.add_argument("--parts", default="edit,anchors,stats,stock")
    p.add_argument("--hparams")
    p.add_argument("--data")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--sizes", default="1,8,32,128")
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--steps", type=int)
    p.add_argument("--texts", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mode", default="replay")
    p.add_argument("--variant")
    p.add_argument("--out")
    p.add_argument("--anchor-layer-note", default="first edit layer")
    args = p.parse_args()
    if args.child:
        result = CHILDREN[args.child](args)
        result["peak_mib"] = peak_mib()
        print("RESULT " + json.dumps(result))
    else:
        parent(args)


if __name__ == "__main__":
    main()
