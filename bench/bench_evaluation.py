"""Evaluation cost per edit (not part of the test run): the metrics ``compare`` and
``scale`` compute for every cell, on the unedited model (the cost does not depend on
the edit), for the first N records of a dataset.

Parts, each timed on its own:

  score     :func:`easyedit_replay.evaluate.evaluate_records` against a reference
            (efficacy, generalization, locality: the paper's Success/Acc/DKL/Top-k and
            EasyEdit's token metrics)
  fluency   :func:`easyedit_replay.experiment.fluency_scores` (24 greedy tokens per
            edit prompt + n-gram entropy)

With ``--compare-rev REV`` the same parts of ``easyedit_replay/evaluate.py`` as it was
at git revision REV (loaded from ``git show``; fluency with its generate batch of 32)
run side by side, alternating, and the largest difference of any metric between the
two is printed (they differ only by float rounding).

With ``--limit`` each part of the current code runs once more under
``torch.utils.flop_counter.FlopCounterMode`` (not timed), and its FLOPs divided by the
measured matmul FLOP/s of this CPU (``_report.matmul_flops_per_s``) give its compute
limit in s/edit, printed next to the measured time ("x limit" = measured / limit).

    python bench/bench_evaluation.py --data ../shared/data/counterfact/counterfact-val.json \\
        --sizes 48,192 --compare-rev 1e5f72e
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import append_results, matmul_flops_per_s  # bench/ is sys.path[0] when a benchmark runs

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
RESULTS = HERE.parent / "results" / "bench_evaluation_cpu.txt"


def module_at(rev: str):
    """``easyedit_replay/evaluate.py`` at git revision ``rev``, imported as a module (its
    relative imports pointed at the installed package)."""
    text = subprocess.run(["git", "show", f"{rev}:easyedit_replay/evaluate.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    text = text.replace("from .", "from easyedit_replay.")
    path = Path(tempfile.mkdtemp()) / f"evaluate_{rev}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"evaluate_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def largest_difference(a, b) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        for k, v in x.items():
            if k == "_locality_logp":
                worst = max(worst, float((v - y[k]).abs().max()))
            elif isinstance(v, float):
                worst = max(worst, abs(v - y[k]))
            elif v != y[k]:
                return float("inf")
    return worst


def limit_line(n: int, timed, flops_s: float, score, fluency) -> str:
    """One line: the FLOPs of ``score()`` and ``fluency()`` (counted, not timed), their
    compute limit in s/edit at ``flops_s``, and the measured ``timed = (score s, fluency s,
    rows)`` as a multiple of it."""
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
    p.add_argument("--compare-rev", help="also time evaluate.py at this git revision, side by side")
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
    variants = {"now": (evaluate.evaluate_records, lambda recs: fluency_scores(model, tok, recs, 24))}
    if args.compare_rev:
        old = module_at(args.compare_rev)
        variants = {args.compare_rev: (old.evaluate_records, lambda recs: [
            old.ngram_entropy(g) for g in old.greedy_generate(model, tok, [r["prompt"] for r in recs], 24)]),
            **variants}
    say(f"\n# bench_evaluation {args.label} | {platform.machine()} torch {torch.__version__} "
        f"threads {torch.get_num_threads()} | data {args.data or 'demo'} | {time.strftime('%Y-%m-%d %H:%M')}")
    reference = evaluate.evaluate_records(model, tok, records, None)
    flops_s = matmul_flops_per_s() if args.limit else None
    if args.limit:
        say(f"matmul {flops_s / 1e9:.1f} GFLOP/s measured ({torch.get_num_threads()} thread(s))")
    for n in sizes:
        recs, ref = records[:n], reference[:n]
        got = {}
        for name, (score, fluency) in variants.items():
            t0 = time.perf_counter()
            rows = score(model, tok, recs, ref)
            t1 = time.perf_counter()
            fluency(recs)
            t2 = time.perf_counter()
            got[name] = (t1 - t0, t2 - t1, rows)
            say(f"n={n:4d} {name:>8}: score {t1 - t0:7.2f} s ({(t1 - t0) / n:.3f} s/edit)  fluency {t2 - t1:7.2f} s "
                f"({(t2 - t1) / n:.3f} s/edit)  per cell {(t2 - t0) / n:.3f} s/edit")
        if args.compare_rev:
            (s0, f0, r0), (s1, f1, r1) = got[args.compare_rev], got["now"]
            say(f"n={n:4d}   ratio: score {s0 / s1:.2f}x, fluency {f0 / f1:.2f}x, per cell {(s0 + f0) / (s1 + f1):.2f}x "
                f"faster; largest metric difference {largest_difference(r0, r1):.1e}")
        if args.limit:
            say(limit_line(n, got["now"], flops_s, lambda: evaluate.evaluate_records(model, tok, recs, ref),
                           lambda: fluency_scores(model, tok, recs, 24)))
    say(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    append_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
