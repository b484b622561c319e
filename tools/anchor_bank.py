"""What an anchor cache folder holds, counted against the first records of edit files.

Reads only each file's metadata (the key that ``easyedit_replay.anchor_cache`` stores
and checks) and its scalar step count, never the anchors, so it is fast on a bank of
thousands of files. Anchors
are grouped by anchor layer, sites (one site: the MEMIT/EMMET/AlphaEdit YAML; two:
PMET's attention and MLP outputs) and model fingerprint (the first 8 hex digits of the
key's fingerprint of every weight: the unedited model has one, each batch of a
sequential series after the first another). With ``--data FILE:N`` it says how many of the first
N records of FILE have a banked anchor in each group, i.e. how much of a ``scale
--n N`` run would come from the bank (a one-batch run reads only the unedited model's
group). A file written for another template set is counted too: such a file is a miss
when a run reads it.

Each line also gives the optimization steps per request (mean, of ``v_num_grad_steps``)
and how many requests ran all of them, i.e. the early stop (loss < 0.05) did not fire
before the last step: the main reason an anchor costs more on one dataset than on
another (README "Cost at scale").

    python tools/anchor_bank.py docs/results/anchors \\
        --data ../shared/data/counterfact/counterfact-val.json:768 --data ../shared/data/zsre/zsre-1k.json:192
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _request(description: dict) -> str:
    return json.dumps(description, sort_keys=True)


def read_keys(folder: Path):
    """``[(group, request, steps, max steps)]`` for every anchor file under ``folder``
    (:meth:`AnchorStore.stored`); ``group`` is ``"layer L, S site(s), model F"`` (``F``:
    the first 8 hex digits of the model fingerprint),
    ``request`` the key's request part (:func:`request_description`) as text, ``steps``
    the optimization steps the anchor took and ``max steps`` its ``v_num_grad_steps``."""
    from easyedit_replay.anchor_cache import AnchorStore

    return [(f"layer {key['layer']}, {len(key['sites'])} site(s), model {key['model'][:8]}", _request(key["request"]),
             steps, int(key["hparams"]["v_num_grad_steps"]))
            for _, key, steps in AnchorStore(folder).stored()]


def steps_summary(files) -> str:
    """``"steps 23.1/25, 55% ran all"`` over ``files`` (``(steps, max steps)`` pairs); ``""``
    when there are none."""
    if not files:
        return ""
    ran_all = sum(steps >= most for steps, most in files)
    most = sorted({m for _, m in files})
    return (f"steps {sum(s for s, _ in files) / len(files):.1f}/{'/'.join(map(str, most))}, "
            f"{ran_all} of {len(files)} ran all ({100 * ran_all / len(files):.0f}%)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default="docs/results/anchors")
    p.add_argument("--data", action="append", default=[], metavar="FILE:N",
                   help="an edit file and how many of its first records to look up (repeatable)")
    args = p.parse_args(argv)

    keys = read_keys(Path(args.folder))
    steps = defaultdict(lambda: defaultdict(list))  # group -> request -> [(steps, max steps)] (one per file)
    for group, req, n_steps, most in keys:
        steps[group][req].append((n_steps, most))
    print(f"{args.folder}: {len(keys)} anchor files")
    for group in sorted(steps):
        files = [f for per_req in steps[group].values() for f in per_req]
        print(f"  {group}: {len(steps[group])} requests, {steps_summary(files)}")
    if args.data:
        from easyedit_replay.anchor_cache import request_description
        from easyedit_replay.data import load_records
        from easyedit_replay.keys import prepare_requests

        for spec in args.data:
            path, _, n = spec.rpartition(":")
            if not path or not n.isdigit():
                p.error(f"--data {spec!r}: give FILE:N, e.g. counterfact-val.json:768")
            reqs = [_request(request_description(r)) for r in prepare_requests(load_records(path, int(n)))]
            for group in sorted(steps):
                have = sum(r in steps[group] for r in reqs)
                files = [f for r in reqs for f in steps[group].get(r, [])]
                tail = f"; {steps_summary(files)}" if files else ""
                print(f"  {Path(path).name} first {len(reqs)}: {group}: {have} banked, {len(reqs) - have} missing{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
