"""Peak memory of the statistics pass on a 128k-context config (not part of the test run).

Each configuration (``--tokens`` x ``--attn``) runs in its own process,
``tests/helpers/stats_memory_child.py`` (SmolLM2-135M with ``max_position_embeddings``
patched to 131072, one very long text plus a few short lines; the same measurement
``tests/test_real_models.py`` bounds), which reports its peak resident set size.

    python benchmarks/stats_memory.py --tokens 2048,8192,32768 --attn eager,sdpa

``--max-length`` sets ``mom2_max_length`` (the sequence-length cap; omitted: the
hparams default). Run this on a checkout without the cap to get "before" numbers
(keep ``--tokens`` small there: without the cap an eager pass over T tokens holds
``heads * T^2`` attention scores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from _report import append_results  # benchmarks/ is sys.path[0] when a benchmark runs

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "helpers" / "stats_memory_child.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2048,8192,32768", help="lengths of the long text (comma-separated)")
    p.add_argument("--attn", default="eager,sdpa", help="attention implementations (comma-separated)")
    p.add_argument("--max-length", type=int, default=None, help="mom2_max_length (default: the hparams default)")
    p.add_argument("--out", default=None, help="append the result lines to this file")
    p.add_argument("--limit-gb", type=float, default=None, help="address-space limit of each measuring process")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    lines = [f"# benchmarks/stats_memory.py {' '.join(sys.argv[1:])}  ({platform.machine()}, torch threads 1)"]
    print(lines[0])
    for attn in args.attn.split(","):
        for n in args.tokens.split(","):
            cmd = [sys.executable, str(CHILD), "--tokens", n, "--attn", attn]
            if args.max_length:
                cmd += ["--max-length", str(args.max_length)]
            if args.limit_gb:
                cmd += ["--limit-gb", str(args.limit_gb)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else \
                json.dumps(dict(attn=attn, tokens=int(n), error=f"exit {out.returncode}: {out.stderr.strip()[-300:]}"))
            print(line, flush=True)
            lines.append(line)
    append_results(args.out, lines)


if __name__ == "__main__":
    main()
