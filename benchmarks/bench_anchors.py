"""Anchor benchmarks, measured side by side in one run (not part of the test run).

  loop   the anchor loop from the anchor layer (``fast_loop=True``) vs the full
         forward pass per step, for N requests (replay anchor of the bundled
         MEMIT YAML, layer 4, and the spread anchor, layer 8): time ratio and the
         max abs difference of the anchors (also relative to the largest delta norm)
  cache  a cold vs a warm ``easyedit-replay compare`` (MEMIT spread + replay) on
         the same edits, each in its own process, with a fresh anchor cache
         (``EASYEDIT_REPLAY_ANCHOR_CACHE``); model and statistics stay in the
         normal cache

  throughput  the anchor loop's throughput (requests per second, cache off) per
         dataset (``--data demo,counterfact,zsre``, the first ``--n`` edits of each),
         next to its compute limit: the FLOPs of the whole optimization per request
         (counted with ``torch.utils.flop_counter.FlopCounterMode`` during the timed
         run, so its Python dispatch overhead is inside the time) divided by the
         measured matmul FLOP/s of this CPU (a ``[4096, 576] @ [576, 1536]`` float32
         product, the MLP shape, same thread count). Also per dataset: the steps each
         request ran before its early stop (of ``v_num_grad_steps``), the rows per
         request (context templates + the KL prompt), their token lengths, and the
         target length, which is what explains a dataset's cost.
  padding  only the padding efficiency (real over padded tokens) of the anchor chunks
         of the first ``--n`` requests per dataset, in file order and sorted by length
         as ``optimize_anchors`` sorts them; no optimization, seconds to run.

The requests of ``loop`` and ``cache`` are the bundled demo edits (24) and, beyond 24,
``../shared/data/counterfact/counterfact-val.json``. ``--steps`` shortens the
anchor optimization (the bundled YAML has 25 steps); the results file says which.

    python benchmarks/bench_anchors.py --sizes 1,8,32 --steps 5 --cache-n 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import matmul_flops_per_s  # benchmarks/ is sys.path[0] when a benchmark runs

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
RESULTS = HERE.parent / "results" / "bench_anchors_cpu.txt"
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"


def _records(n):
    from easyedit_replay.data import load_records

    records = load_records()
    if n > len(records):
        records = records + load_records(COUNTERFACT, n - len(records))
    return records[:n]


def bench_loop(args, say):
    from easyedit_replay.anchors import Objective, optimize_anchors
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.editor import resolve_templates
    from easyedit_replay.algorithms import load_hparams
    from easyedit_replay.prompts import prepare_requests
    from easyedit_replay.models import load_model

    hp = load_hparams(default_hparams_path(), **({"v_num_grad_steps": args.steps} if args.steps else {}))
    model, tok = load_model(hp.model_name)
    templates = resolve_templates(model, tok, hp)
    say(f"\n[loop] MEMIT anchors, {hp.v_num_grad_steps} steps{' (shortened with --steps)' if args.steps else ''}, "
        f"anchor_batch_size {hp.anchor_batch_size}, cache off, {len(templates[1]) + 1} context templates")
    say(f"  best of {args.repeats} alternating runs (full, from layer, from layer, full, ...) after one untimed "
        f"warm-up of each; other jobs shared the cores, so seconds are noisy")
    say(f"  {'layer':>5} {'requests':>8} {'full s':>8} {'from layer s':>12} {'speedup':>8} {'max |diff|':>11} "
        f"{'rel':>9} {'steps':>6}")
    layers = {"replay": hp.layers[0], "spread": hp.layers[-1]}
    for what in args.anchors.split(","):
        layer = layers[what]
        for n in [int(x) for x in args.sizes.split(",")]:
            reqs = prepare_requests(_records(n))
            objective = Objective.of(hp, layer, [hp.layer_module_tmp], templates)
            run = lambda fast, r=reqs: optimize_anchors(model, tok, r, objective, chunk_size=hp.anchor_batch_size,  # noqa: E731
                                                        cache=False, fast_loop=fast)
            if n == int(args.sizes.split(",")[0]):
                run(False, reqs[:1]), run(True, reqs[:1])  # warm-up
            times, res = {False: [], True: []}, {}
            for rep in range(args.repeats):
                for fast in ((False, True) if rep % 2 == 0 else (True, False)):
                    start = time.perf_counter()
                    res[fast] = run(fast)
                    times[fast].append(time.perf_counter() - start)
            full, fast = res[False], res[True]
            diff = float((fast.delta - full.delta).abs().max())
            rel = diff / float(full.delta.norm(dim=-1).max())
            t_full, t_fast = min(times[False]), min(times[True])
            say(f"  {layer:5d} {n:8d} {t_full:8.1f} {t_fast:12.1f} {t_full / t_fast:7.2f}x {diff:11.2e} {rel:9.2e} "
                f"{int(full.steps.sum()):6d}   ({what} anchor)")


DATASETS = {"demo": None, "counterfact": COUNTERFACT,
            "zsre": ROOT.parent / "shared" / "data" / "zsre" / "zsre-1k.json"}


def padding_efficiency(rows, order, chunk: int) -> float:
    """Real over padded tokens when the requests in ``order`` (None: sorted by their longest
    row, as ``optimize_anchors`` orders them) go in chunks of ``chunk``, every row of a chunk
    padded to the chunk's longest row."""
    by_request = {}
    for row in rows:
        by_request.setdefault(row.request, []).append(len(row.ids))
    if order is None:
        order = sorted(by_request, key=lambda r: max(by_request[r]))
    real = padded = 0
    for start in range(0, len(order), chunk):
        lens = [n for r in order[start:start + chunk] for n in by_request[r]]
        real, padded = real + sum(lens), padded + max(lens) * len(lens)
    return real / padded


def say_padding(name: str, n: int, tok, templates, hp, say):
    """Print the padding efficiency of the anchor chunks of the first ``n`` requests of
    dataset ``name``, in file order and sorted by length (``optimize_anchors``' order);
    returns ``(requests, rows)``."""
    from easyedit_replay.anchors.objective import build_rows
    from easyedit_replay.data import load_records
    from easyedit_replay.prompts import prepare_requests

    reqs = prepare_requests(load_records(DATASETS[name], n))
    rows = build_rows(tok, reqs, templates, hp.fact_token, None)
    say(f"  {name}, {len(reqs)} requests: padding efficiency (real / padded tokens) of chunks of "
        f"{hp.anchor_batch_size}: file order {padding_efficiency(rows, list(range(len(reqs))), hp.anchor_batch_size):.2f}, "
        f"by length {padding_efficiency(rows, None, hp.anchor_batch_size):.2f}")
    return reqs, rows


def bench_padding(args, say):
    """Padding efficiency only (no optimization): the token counts behind sorting the
    requests by length before chunking."""
    from easyedit_replay.algorithms import load_hparams
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.editor import resolve_templates
    from easyedit_replay.models import load_model

    hp = load_hparams(default_hparams_path())
    model, tok = load_model(hp.model_name)
    templates = resolve_templates(model, tok, hp)
    say(f"\n[padding] MEMIT anchor chunks of {hp.anchor_batch_size} requests, rows padded to the chunk's longest")
    for name in args.data.split(","):
        say_padding(name, args.n, tok, templates, hp, say)


def bench_throughput(args, say):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from easyedit_replay.anchors import Objective, optimize_anchors
    from easyedit_replay.anchors.objective import target_token_ids
    from easyedit_replay.algorithms import load_hparams
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.editor import resolve_templates
    from easyedit_replay.models import load_model

    hp = load_hparams(default_hparams_path(), **({"v_num_grad_steps": args.steps} if args.steps else {}))
    model, tok = load_model(hp.model_name)
    templates = resolve_templates(model, tok, hp)
    layers = {"replay": hp.layers[0], "spread": hp.layers[-1]}
    flops_s = matmul_flops_per_s()
    say(f"\n[throughput] MEMIT anchors, {hp.v_num_grad_steps} steps max, chunks of {hp.anchor_batch_size}, cache off; "
        f"matmul {flops_s / 1e9:.1f} GFLOP/s measured ({torch.get_num_threads()} thread(s))")
    say(f"  {'data':>11} {'layer':>5} {'req':>4} {'s/req':>7} {'req/s':>7} {'GFLOP/req':>9} {'limit s/req':>11} "
        f"{'x limit':>7} {'steps/req':>9} {'rows/req':>8} {'tok/row':>7} {'max tok':>7} {'target tok':>10}")
    for name in args.data.split(","):
        reqs, rows = say_padding(name, args.n, tok, templates, hp, say)
        lens = [len(r.ids) for r in rows]
        target = sum(len(target_token_ids(tok, r.target_new)) for r in reqs) / len(reqs)
        for what in args.anchors.split(","):
            layer = layers[what]
            counter = FlopCounterMode(display=False)
            start = time.perf_counter()
            with counter:
                res = optimize_anchors(model, tok, reqs, Objective.of(hp, layer, [hp.layer_module_tmp], templates),
                                       chunk_size=hp.anchor_batch_size, cache=False)
            wall = time.perf_counter() - start
            per_req = counter.get_total_flops() / len(reqs)
            limit = per_req / flops_s
            say(f"  {name:>11} {layer:5d} {len(reqs):4d} {wall / len(reqs):7.2f} {len(reqs) / wall:7.3f} "
                f"{per_req / 1e9:9.0f} {limit:11.2f} {wall / len(reqs) / limit:6.1f}x "
                f"{float(res.steps.float().mean()):9.1f} {len(rows) / len(reqs):8.1f} {sum(lens) / len(lens):7.1f} "
                f"{max(lens):7d} {target:10.2f}")


def bench_cache(args, say):
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, EASYEDIT_REPLAY_ANCHOR_CACHE=str(Path(tmp) / "anchors"),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = [sys.executable, "-m", "easyedit_replay.cli", "compare", "--algs", "MEMIT", "--n", str(args.cache_n),
                "--no-fluency", "--no-target-accuracy"] + (["--steps", str(args.steps)] if args.steps else [])
        runs = {}
        for name in ("cold", "warm"):
            out_json = Path(tmp) / f"{name}.json"
            start = time.perf_counter()
            proc = subprocess.run(argv + ["--json", str(out_json)], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"compare ({name}) failed")
            results = json.loads(out_json.read_text())
            edit = sum(r["seconds"] for r in results["runs"].values())
            segments = [seg for line in proc.stderr.splitlines() for seg in line.split("\r")]  # tqdm redraws
            lines = [seg[seg.index("anchors at"):] for seg in segments if "loaded from the cache" in seg]
            runs[name] = (wall, edit, lines)
    say(f"\n[cache] easyedit-replay compare --algs MEMIT --n {args.cache_n} (spread + replay)"
        f"{f' --steps {args.steps}' if args.steps else ''} --no-fluency --no-target-accuracy, fresh anchor cache")
    for name, (wall, edit, lines) in runs.items():
        say(f"  {name}: process {wall:6.1f} s, edit time (sum over modes) {edit:6.1f} s; " + "; ".join(lines))
    say(f"  cold / warm: process {runs['cold'][0] / runs['warm'][0]:.2f}x, edit time {runs['cold'][1] / runs['warm'][1]:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="loop,cache", help="comma-separated: loop, cache, throughput, padding")
    p.add_argument("--sizes", default="1,8,32")
    p.add_argument("--steps", type=int, help="override v_num_grad_steps (default: the YAML's 25)")
    p.add_argument("--cache-n", type=int, default=8)
    p.add_argument("--anchors", default="replay,spread", help="which anchor layers: replay (first edit layer), spread (last)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data", default="demo,counterfact,zsre", help="throughput, padding: datasets (demo, counterfact, zsre)")
    p.add_argument("--n", type=int, default=16, help="throughput, padding: requests per dataset")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    import torch

    lines = []

    def say(text):
        print(text, flush=True)
        lines.append(text)

    say(f"benchmarks/bench_anchors.py {' '.join(sys.argv[1:])}")
    say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M')}")
    parts = args.parts.split(",")
    if "loop" in parts:
        bench_loop(args, say)
    if "cache" in parts:
        bench_cache(args, say)
    if "throughput" in parts:
        bench_throughput(args, say)
    if "padding" in parts:
        bench_padding(args, say)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
