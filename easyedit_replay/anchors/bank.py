"""Anchor banks: ``easyedit-replay anchors info | bank``.

An anchor bank is an anchor disk cache folder (:mod:`easyedit_replay.anchors.store`)
kept and shared on purpose, e.g. committed beside measured results
(``docs/results/anchors``) so that a later run on any machine loads the anchors
instead of optimizing them again.

``anchors info [FOLDER] [--data FILE:N ...]`` says what a folder holds. It reads only
each file's metadata (the key the cache stores and checks) and its scalar step count,
never the anchors, so it is fast on thousands of files. Anchors are grouped by anchor
layer, sites (one site: the MEMIT/EMMET/AlphaEdit YAML; two: PMET's attention and
MLP outputs), the anchor settings (clamp, ``v_lr``, decay: one group per operating
point) and model fingerprint (the first 8 hex digits of the key's fingerprint
of every weight: the unedited model has one, each batch of a sequential series after
the first another). With ``--data FILE:N`` it says how many of the first N records
of FILE have a banked anchor in each group, i.e. how much of a ``scale --n N`` run
would come from the bank (a one-batch run reads only the unedited model's group). A
file written for another template set is counted too: such a file is a miss when a
run reads it. Each line also gives the optimization steps per request (mean, of
``v_num_grad_steps``) and how many requests ran all of them, i.e. the early stop
(loss < 0.05) did not fire before the last step.

``anchors bank --data FILE:N [--shard j/k]`` fills a bank ahead of the edits. It
computes only the anchors (:func:`easyedit_replay.editor.compute_anchors`: the edit's
own set-up, so the same cache keys) for every ``k``-th of the first ``N`` records, so
``k`` processes (cores, GPUs, machines sharing a folder) fill one bank side by side;
requests already banked are loaded, not optimized. A later ``scale`` or ``compare``
run on the same records then finds every anchor. Anchors depend on the weights, so
this fills one-batch cells and the first batch of a sequential series only (later
batches see an edited model).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import ReplayError

DEFAULT_FOLDER = "docs/results/anchors"


def parse_data_spec(spec: str) -> Tuple[str, int]:
    """``"FILE:N"`` -> ``(FILE, N)``.

    Raises:
        ReplayError: no ``:N`` with a non-negative integer ``N``.
    """
    path, _, n = spec.rpartition(":")
    if not path or not n.isdigit():
        raise ReplayError(f"--data {spec!r}: give FILE:N, e.g. counterfact-val.json:768")
    return path, int(n)


def shard_indices(n: int, shard: str) -> List[int]:
    """Indices ``i`` in ``0..n-1`` of shard ``"j/k"`` (``i % k == j - 1``).

    Raises:
        ReplayError: ``shard`` is not ``j/k`` with ``1 <= j <= k``.
    """
    j, _, k = shard.partition("/")
    if not (j.isdigit() and k.isdigit() and 1 <= int(j) <= int(k)):
        raise ReplayError(f"--shard {shard!r}: give j/k with 1 <= j <= k, e.g. 1/2")
    return [i for i in range(n) if i % int(k) == int(j) - 1]


def _request(description: dict) -> str:
    return json.dumps(description, sort_keys=True)


def read_keys(folder: Path):
    """``[(group, request, steps, max steps)]`` for every anchor file under ``folder``
    (:meth:`~easyedit_replay.anchors.store.AnchorStore.stored`); ``group`` is
    ``"layer L, S site(s), model F, clamp C, v_lr R, decay W"`` (``F``: the first 8 hex
    digits of the model fingerprint; ``C``, ``R``, ``W``: the anchor objective's
    ``clamp_norm_factor``, ``v_lr`` and ``v_weight_decay``, so anchors made at different
    operating points are separate groups, as they are separate cache keys), ``request`` the key's request part
    (:func:`~easyedit_replay.anchors.store.request_description`) as text, ``steps`` the
    optimization steps the anchor took and ``max steps`` its ``v_num_grad_steps``."""
    from .store import AnchorStore

    def group(key: dict) -> str:
        hp = key["hparams"]
        return (f"layer {key['layer']}, {len(key['sites'])} site(s), model {key['model'][:8]}, "
                f"clamp {float(hp['clamp_norm_factor']):g}, v_lr {float(hp['v_lr']):g}, "
                f"decay {float(hp['v_weight_decay']):g}")

    return [(group(key), _request(key["request"]), steps, int(key["hparams"]["v_num_grad_steps"]))
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


def info(folder: str, data: Sequence[str] = ()) -> List[str]:
    """The lines ``anchors info`` prints: every group of ``folder`` with its request count
    and steps, then for each ``FILE:N`` of ``data`` how many of those records each group
    holds.

    Raises:
        ReplayError: a ``data`` item that is not ``FILE:N``.
    """
    specs = [parse_data_spec(spec) for spec in data]  # bad input fails before any file is read
    keys = read_keys(Path(folder))
    steps = defaultdict(lambda: defaultdict(list))  # group -> request -> [(steps, max steps)] (one per file)
    for group, req, n_steps, most in keys:
        steps[group][req].append((n_steps, most))
    lines = [f"{folder}: {len(keys)} anchor files"]
    for group in sorted(steps):
        files = [f for per_req in steps[group].values() for f in per_req]
        lines.append(f"  {group}: {len(steps[group])} requests, {steps_summary(files)}")
    if specs:
        from ..data import load_records
        from ..prompts import prepare_requests
        from .store import request_description

        for path, n in specs:
            reqs = [_request(request_description(r)) for r in prepare_requests(load_records(path, n))]
            for group in sorted(steps):
                have = sum(r in steps[group] for r in reqs)
                files = [f for r in reqs for f in steps[group].get(r, [])]
                tail = f"; {steps_summary(files)}" if files else ""
                lines.append(f"  {Path(path).name} first {len(reqs)}: {group}: {have} banked, "
                             f"{len(reqs) - have} missing{tail}")
    return lines


def bank(hparams_path, data: str, modes: Sequence[str], shard: str = "1/1", progress: bool = True,
         records: Optional[str] = None) -> List[str]:
    """Optimize (or load) the anchors of shard ``shard`` of the first N records of ``data``
    (``FILE:N``; with ``records="START:END"`` the first N of that slice of the file, as
    ``compare --records``) for every construction in ``modes``, with the YAML at
    ``hparams_path``, into the anchor cache (``$EASYEDIT_REPLAY_ANCHOR_CACHE`` or the user
    cache). Returns the lines ``anchors bank`` prints.

    Raises:
        ReplayError: a bad ``data`` or ``shard`` (before the model loads), or any error
            of :func:`~easyedit_replay.editor.compute_anchors`.
    """
    import logging

    from ..algorithms import load_hparams
    from ..data import load_records, parse_records
    from ..editor import compute_anchors
    from ..models import load_model
    from .store import anchor_cache_dir

    path, n = parse_data_spec(data)
    idx = shard_indices(n, shard)
    logging.getLogger("easyedit_replay.anchors").setLevel(logging.INFO)  # anchors loaded vs optimized
    hp = load_hparams(hparams_path)
    where = f"{Path(path).name}[{records}]" if records else Path(path).name
    selected = load_records(path, n, records=parse_records(records))
    batch = [selected[i] for i in idx]
    model, tok = load_model(hp.model_name)
    lines = [f"{len(batch)} of the first {n} records of {where} (shard {shard}), "
             f"{hp.alg_name}, modes {','.join(modes)}, bank {anchor_cache_dir()}"]
    print(lines[-1], flush=True)
    for mode in modes:
        start = time.perf_counter()
        anchors = compute_anchors(model, tok, batch, hp, mode, progress=progress)
        lines.append(f"{mode}: anchor layer(s) {sorted(anchors)} for {len(batch)} requests in "
                     f"{time.perf_counter() - start:.0f} s")
        print(lines[-1], flush=True)
    return lines


def _cmd_info(args) -> int:
    print("\n".join(info(args.folder, args.data)))
    return 0


def _cmd_bank(args, default_hparams: Callable[..., Path]) -> int:
    if args.bank:
        os.environ["EASYEDIT_REPLAY_ANCHOR_CACHE"] = str(Path(args.bank).resolve())
    bank(args.hparams or default_hparams(f"{args.alg}_REPLAY", args.point), args.data, args.modes.split(","),
         args.shard, progress=not args.quiet, records=args.records)
    return 0


def add_subcommands(sub, default_hparams: Callable[..., Path]) -> None:
    """Add ``anchors info`` and ``anchors bank`` to the CLI's subparsers ``sub``;
    ``default_hparams(alg_name, point)`` gives the bundled YAML of ``--alg`` at ``--point``."""
    a = sub.add_parser("anchors", help="anchor banks: what a folder holds (info), fill one ahead of the edits (bank)")
    asub = a.add_subparsers(dest="anchors_command", required=True)
    i = asub.add_parser("info", help="count a folder's anchors per anchor layer, sites and model, against the first "
                        "records of edit files")
    i.add_argument("folder", nargs="?", default=DEFAULT_FOLDER, help=f"anchor folder (default {DEFAULT_FOLDER})")
    i.add_argument("--data", action="append", default=[], metavar="FILE:N",
                   help="an edit file and how many of its first records to look up (repeatable)")
    i.set_defaults(func=_cmd_info)
    b = asub.add_parser("bank", help="optimize the anchors of the first N records into the anchor cache, one "
                        "shard per process")
    b.add_argument("--data", required=True, metavar="FILE:N", help="an edit file and how many of its first records to bank")
    b.add_argument("--alg", default="MEMIT", help="base algorithm of the bundled SmolLM2 YAML (default MEMIT; "
                   "EMMET and AlphaEdit share its anchors)")
    b.add_argument("--hparams", help="a plugin YAML instead of the bundled one")
    b.add_argument("--point", default="bundled", help="operating point of the bundled YAML: bundled (default), paper or "
                   "host-fe")
    b.add_argument("--records", help="take the first N records of this slice of FILE, START:END (as compare "
                   "--records)")
    b.add_argument("--modes", default="spread,replay", help="constructions whose anchors to bank (default "
                   "spread,replay)")
    b.add_argument("--shard", default="1/1", help="j/k: this process takes every k-th request, from the j-th (1 <= j "
                   "<= k; default 1/1, every request)")
    b.add_argument("--bank", help="anchor folder (default: $EASYEDIT_REPLAY_ANCHOR_CACHE, else the cache "
                   "root's anchors/, ~/.cache/easyedit_replay/anchors)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=lambda args: _cmd_bank(args, default_hparams))
