"""Fill an anchor bank ahead of the edits, in several processes on disjoint requests.

A ``scale`` or ``compare`` run optimizes the anchors its cells lack in one process,
one chunk after another. This computes only the anchors (``editor.compute_anchors``:
the same set-up, so the same cache keys) for every ``k``-th request of the first
``N`` records, so ``k`` processes (cores, GPUs, machines sharing a folder) fill one
bank side by side; requests already banked are loaded, not optimized. A later
``scale``/``compare`` run on the same records then finds every anchor ("0 optimized").

    export EASYEDIT_REPLAY_ANCHOR_CACHE=$PWD/docs/results/anchors OMP_NUM_THREADS=1
    python tools/bank_anchors.py --data $CF:768 --modes replay --shard 1/2 &
    python tools/bank_anchors.py --data $CF:768 --modes replay --shard 2/2 &

Anchors depend on the weights, so this fills one-batch cells and the first batch of a
sequential series only (later batches see an edited model).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path


def shard_indices(n: int, shard: str):
    """Indices ``i`` in ``0..n-1`` of shard ``"j/k"`` (``i % k == j - 1``).

    Raises:
        ValueError: ``shard`` is not ``j/k`` with ``1 <= j <= k``.
    """
    j, _, k = shard.partition("/")
    if not (j.isdigit() and k.isdigit() and 1 <= int(j) <= int(k)):
        raise ValueError(f"--shard {shard!r}: give j/k with 1 <= j <= k, e.g. 1/2")
    return [i for i in range(n) if i % int(k) == int(j) - 1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, metavar="FILE:N", help="an edit file and how many of its first records")
    p.add_argument("--alg", default="MEMIT", help="base algorithm of the bundled SmolLM2 YAML (default MEMIT; "
                   "EMMET and AlphaEdit share its anchors)")
    p.add_argument("--hparams", help="a plugin YAML instead of the bundled one")
    p.add_argument("--modes", default="spread,replay", help="constructions whose anchors to bank (default spread,replay)")
    p.add_argument("--shard", default="1/1", help="j/k: this process takes every k-th request, from the j-th")
    p.add_argument("--bank", help="anchor folder (default: $EASYEDIT_REPLAY_ANCHOR_CACHE or the user cache)")
    args = p.parse_args(argv)
    path, _, n = args.data.rpartition(":")
    if not path or not n.isdigit():
        p.error(f"--data {args.data!r}: give FILE:N, e.g. counterfact-val.json:768")
    try:
        idx = shard_indices(int(n), args.shard)
    except ValueError as exc:
        p.error(str(exc))
    if args.bank:
        os.environ["EASYEDIT_REPLAY_ANCHOR_CACHE"] = str(Path(args.bank).resolve())

    from easyedit_replay.algorithms import load_hparams
    from easyedit_replay.anchor_cache import anchor_cache_dir
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.data import load_records
    from easyedit_replay.editor import compute_anchors
    from easyedit_replay.models import load_model

    logging.basicConfig(format="%(message)s")
    logging.getLogger("easyedit_replay.anchor").setLevel(logging.INFO)  # anchors loaded vs optimized
    hp = load_hparams(args.hparams or default_hparams_path(alg=f"{args.alg}_REPLAY"))
    records = load_records(path, int(n))
    batch = [records[i] for i in idx]
    model, tok = load_model(hp.model_name)
    print(f"{len(batch)} of the first {n} records of {Path(path).name} (shard {args.shard}), "
          f"{hp.alg_name}, modes {args.modes}, bank {anchor_cache_dir()}", flush=True)
    for mode in args.modes.split(","):
        start = time.perf_counter()
        anchors = compute_anchors(model, tok, batch, hp, mode=mode, progress=True)
        print(f"{mode}: anchor layer(s) {sorted(anchors)} for {len(batch)} requests in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
