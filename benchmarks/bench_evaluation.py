"""Evaluation cost per edit (not part of the test run): the metrics ``compare`` and
``scale`` compute for every cell, on the unedited model (the cost does not depend on
the edit), for the first N records of a dataset.

Parts, each timed on its own:

  score     :func:`easyedit_replay.evaluate.evaluate_records` against a reference
            (efficacy, generalization, locality: the paper's Success/Acc/DKL/Top-k and
            EasyEdit's token metrics)
  fluency   :func:`easyedit_replay.experiment.fluency_scores` (24 greedy tokens per
            edit prompt + n-gram entropy)

With ``--limit`` each part of the current code runs once more under
``torch.utils.flop_counter.FlopCounterMode`` (not timed), and its FLOPs divided by the
measured matmul FLOP/s of this CPU (``_report.matmul_flops_per_s``) give its compute
limit in s/edit, printed next to the measured time ("x limit" = measured / limit).

    python benchmarks/bench_evaluation.py --data ../shared/data/counterfact/counterfact-val.json \\
        --sizes 48,192 --limit
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

from _report import append_results, matmul_flops_per_s  # benchmarks/ is sys.path[0] when a benchmark runs

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "bench_evaluation_cpu.txt"


def limit_line(n: int, timed, flops_s: float, score, fluency) -> str:
    """One line: the FLOPs of ``score()`` and ``fluency()`` (counted, not timed), their
    compute limit in s/edit at ``flops_s``, and the measured ``timed = (score s, fluency s)``
    as a multiple of it."""
    from torch.utils.flop_counter import FlopCounterMode

    parts = []
    for name, run, seconds in (("score", score, timed[0]), ("fluency", fluency, timed[1])):
        counter = FlopCounterMode(display=False)
        with counter:
            run()
        limit = counter.get_total_flops() / flops_s
        parts.append((name, counter.get_total_flops(), limit, seconds))
    total_limit, total = sum(p[2] for p in parts), sum(p[3] for p in parts)
    text = "  ".join(f"{name} {fl / 1e12:.2f} TFLOP, limit {lim / n:.3f} s/edit ({sec / lim:.1f}x limit)"
                     for name, fl, lim, sec in parts)
    return (f"n={n:4d}   limit: {text}; per cell limit {total_limit / n:.3f} s/edit, measured "
            f"{total / n:.3f} ({total / total_limit:.1f}x limit)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="edits file (default: the bundled demo edits)")
    p.add_argument("--sizes", default="8,48")
    p.add_argument("--limit", action="store_true",
                   help="also count each part's FLOPs and print its compute limit next to its time")
    p.add_argument("--label", default="", help="a note written next to the numbers")
    p.add_argument("--out", default=str(RESULTS), help="append the results here ('' to skip)")
    args = p.parse_args(argv)

    import torch

    from easyedit_replay import evaluate
    from easyedit_replay.data import load_records
    from easyedit_replay.experiment import fluency_scores
    from easyedit_replay.models import load_model

    lines = []

    def say(text):
        print(text, flush=True)
        lines.append(text)

    model, tok = load_model("smollm2-135m")
    sizes = [int(s) for s in args.sizes.split(",")]
    records = load_records(args.data, max(sizes))
    say(f"\n# bench_evaluation {args.label} | {platform.machine()} torch {torch.__version__} "
        f"threads {torch.get_num_threads()} | data {args.data or 'demo'} | {time.strftime('%Y-%m-%d %H:%M')}")
    reference = evaluate.evaluate_records(model, tok, records, None)
    flops_s = matmul_flops_per_s() if args.limit else None
    if args.limit:
        say(f"matmul {flops_s / 1e9:.1f} GFLOP/s measured ({torch.get_num_threads()} thread(s))")
    for n in sizes:
        recs, ref = records[:n], reference.subset(range(n))

        def score():
            return evaluate.evaluate_records(model, tok, recs, ref)

        def fluency():
            return fluency_scores(model, tok, recs, 24)

        t0 = time.perf_counter()
        score()
        t1 = time.perf_counter()
        fluency()
        t2 = time.perf_counter()
        say(f"n={n:4d}: score {t1 - t0:7.2f} s ({(t1 - t0) / n:.3f} s/edit)  fluency {t2 - t1:7.2f} s "
            f"({(t2 - t1) / n:.3f} s/edit)  per cell {(t2 - t0) / n:.3f} s/edit")
        if args.limit:
            say(limit_line(n, (t1 - t0, t2 - t1), flops_s, score, fluency))
    say(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    append_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
