"""What an anchor cache folder holds, counted against the first records of edit files.

Reads only each file's metadata (the key that ``easyedit_replay.anchor_cache`` stores
and checks), never the tensors, so it is fast on a bank of thousands of files. Anchors
are grouped by anchor layer and sites (one site: the MEMIT/EMMET/AlphaEdit YAML; two:
PMET's attention and MLP outputs). With ``--data FILE:N`` it says how many of the first
N records of FILE have a banked anchor in each group, i.e. how much of a ``scale
--n N`` run would come from the bank. A file written for another model or template
set is counted too (the key's model fingerprint is printed per group): such a file is
a miss when a run reads it.

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
    """``[(group, model fingerprint, request)]`` for every anchor file under ``folder``
    (:meth:`AnchorStore.stored_keys`); ``group`` is ``"layer L, S site(s)"`` and
    ``request`` the key's request part (:func:`request_description`) as text."""
    from easyedit_replay.anchor_cache import AnchorStore

    return [(f"layer {key['layer']}, {len(key['sites'])} site(s)", key["model"], _request(key["request"]))
            for _, key in AnchorStore(folder).stored_keys()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default="docs/results/anchors")
    p.add_argument("--data", action="append", default=[], metavar="FILE:N",
                   help="an edit file and how many of its first records to look up (repeatable)")
    args = p.parse_args(argv)

    keys = read_keys(Path(args.folder))
    groups = defaultdict(set)
    models = defaultdict(set)
    for group, model, req in keys:
        groups[group].add(req)
        models[group].add(model)
    print(f"{args.folder}: {len(keys)} anchor files")
    for group in sorted(groups):
        print(f"  {group}: {len(groups[group])} requests (model fingerprints: {', '.join(sorted(models[group]))})")
    if args.data:
        from easyedit_replay.anchor_cache import request_description
        from easyedit_replay.data import load_records
        from easyedit_replay.keys import prepare_requests

        for spec in args.data:
            path, _, n = spec.rpartition(":")
            if not path or not n.isdigit():
                p.error(f"--data {spec!r}: give FILE:N, e.g. counterfact-val.json:768")
            reqs = [_request(request_description(r)) for r in prepare_requests(load_records(path, int(n)))]
            for group in sorted(groups):
                have = sum(r in groups[group] for r in reqs)
                print(f"  {Path(path).name} first {len(reqs)}: {group}: {have} banked, {len(reqs) - have} missing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
