"""Where one ``scale`` cell spends its time at large n (not part of the test run).

Runs ONE one-batch cell (MEMIT, ``--mode``, the first ``--n`` records of ``--data``)
exactly as ``easyedit-replay scale`` does (:func:`easyedit_replay.experiment.run_mode`
after the unedited reference), under ``cProfile``, and reports the cumulative seconds
of each stage and the peak resident memory of the process:

  anchors       optimize_anchors (zero here: see below)
  statistics    second_moments (loaded from the cache after the first run)
  keys/reads    read_at_lookup: keys, current states and the trajectory reads
  solve         the update rule (MEMIT: the linear solve)
  evaluation    evaluate_records (the edited cell and the unedited reference)
  fluency       fluency_scores (greedy generation)

The anchors are NOT optimized: a pool of anchors with zero deltas (the unedited
states at the lookup token, one batched read) stands in for them, so the other
stages run at full size in minutes. Their cost at 25 steps is the anchor loop's
seconds per request (``benchmarks/bench_anchors.py --parts throughput``) times the
requests and anchor layers; the report prints that product next to the measured
stages when ``--anchor-s-per-request`` is given.

    python benchmarks/bench_scale_cost.py --data ../shared/data/counterfact/counterfact-val.json --n 768
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
import time
from pathlib import Path

from _report import append_results  # benchmarks/ is sys.path[0] when a benchmark runs

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "bench_scale_cost_cpu.txt"
STAGES = (("anchors", "optimize_anchors"), ("statistics", "second_moments"), ("keys/reads", "read_at_lookup"),
          ("solve", "update"), ("evaluation", "evaluate_records"), ("fluency", "fluency_scores"))


def put_zero_anchors(memory, model, tok, records, hp, construction, templates) -> None:
    """Put the unedited lookup states with zero deltas at the construction's anchor layers
    into the in-process anchor layer ``memory``, under the keys :func:`run_mode` looks up."""
    import torch

    from easyedit_replay.algorithms import get_algorithm
    from easyedit_replay.anchors import cache_keys
    from easyedit_replay.anchors.store import Entry
    from easyedit_replay.prompts import prepare_requests
    from easyedit_replay.reads import bare_probes, read_at_lookup

    reg = get_algorithm(hp.alg_name)
    reqs = prepare_requests(records, leading_space=reg.rule.leading_space(model, hp))
    probes = bare_probes(tok, reqs, hp.fact_token)
    for layer in construction.anchor_layers(hp.layers):
        objective = reg.rule.anchor_objective(hp, layer, templates)
        site = objective.sites[0]
        init = read_at_lookup(model, tok, probes, outputs=[site])["out:" + site]
        for key, h in zip(cache_keys(model, tok, reqs, objective), init):
            memory.put(key, Entry(h[None], torch.zeros((1, h.shape[-1])), torch.tensor(0.0), torch.tensor(0)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--n", type=int, default=768)
    p.add_argument("--mode", default="spread")
    p.add_argument("--anchor-s-per-request", type=float, help="seconds per request of the anchor loop (25 steps)")
    p.add_argument("--label", default="")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    import torch

    from easyedit_replay.algorithms import load_hparams
    from easyedit_replay.anchors import in_process
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.data import load_records
    from easyedit_replay.editor import resolve_templates
    from easyedit_replay.experiment import mode_hparams, run_mode, unedited_block
    from easyedit_replay.models import cache_root, load_model
    from easyedit_replay.scale import ScaleConfig

    model, tok = load_model("smollm2-135m")
    hp = load_hparams(default_hparams_path(alg="MEMIT_REPLAY"), stats_dir=str(cache_root() / "stats"))
    hp, construction = mode_hparams(hp, "MEMIT", args.mode)
    records = load_records(args.data, args.n)
    templates = resolve_templates(model, tok, hp)
    cfg = ScaleConfig(sizes=[args.n], progress=False).compare_config()
    prof = cProfile.Profile()
    with in_process(model) as memory:
        put_zero_anchors(memory, model, tok, records, hp, construction, templates)
        start = time.perf_counter()
        prof.enable()
        baseline, _ = unedited_block(model, tok, records, cfg)
        run = run_mode(model, tok, records, hp, construction, cfg, baseline, templates, None)
        prof.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(prof)
    cum = {}
    for (file, _, func), (_, _, _, ct, _) in stats.stats.items():
        for stage, name in STAGES:
            if func == name and "easyedit_replay" in file:
                cum[stage] = cum.get(stage, 0.0) + ct
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [f"\n# bench_scale_cost {args.label} | n={args.n} MEMIT/{args.mode} | data {args.data or 'demo'} | "
             f"torch {torch.__version__} threads {torch.get_num_threads()} | {time.strftime('%Y-%m-%d %H:%M')}",
             f"cell + unedited reference: {wall:.1f} s wall, peak RSS {peak:.0f} MiB (anchors not optimized)"]
    for stage, _ in STAGES:
        sec = cum.get(stage, 0.0)
        lines.append(f"  {stage:<11} {sec:8.1f} s  ({sec / args.n:.3f} s/edit)")
    lines.append(f"  edit (compute + apply) {run['seconds']:.1f} s; evaluation of the edited cell "
                 f"{run['timing']['eval_seconds']:.1f} s + fluency {run['timing']['fluency_seconds']:.1f} s = "
                 f"{(run['timing']['eval_seconds'] + run['timing']['fluency_seconds']) / args.n:.3f} s/edit")
    if args.anchor_s_per_request:
        n_layers = 1
        est = args.anchor_s_per_request * args.n * n_layers
        lines.append(f"  anchors at 25 steps (estimated: {args.anchor_s_per_request:.1f} s/request x {args.n} requests "
                     f"x {n_layers} anchor layer): {est:.0f} s = {est / 3600:.1f} h")
    print("\n".join(lines))
    append_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
