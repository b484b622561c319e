"""The anchor cache: one key per request, an in-process layer in front of a disk store.

:func:`easyedit_replay.anchors.loop.optimize_anchors` looks every request up here
before optimizing, optimizes only the misses (in chunks, as without the cache)
and writes each chunk's anchors as soon as the chunk finishes, so an interrupted
run resumes from the chunks already written and runs over more or fewer requests
reuse what they share.

A request's key (:func:`request_keys`, the one key definition) is a blake2b digest of
everything its anchor depends on:

- the model (:class:`ModelIdentity`): a fingerprint of every parameter's bytes, names,
  shapes and dtypes (:func:`model_fingerprint`), the model config (without its path),
  the weights' dtype and the device type;
- the :class:`~easyedit_replay.anchors.objective.Objective`: the anchor layer, the
  formatted site and loss-layer module names, the hyperparameters
  ``v_num_grad_steps, v_lr, v_loss_layer, v_weight_decay, clamp_norm_factor,
  kl_factor, fact_token, layer_module_tmp, ln_f_module, lm_head_module``,
  ``nll_factor``, ``adaptive_nll``, the early-stop loss and the context templates;
- the request as prepared (``prompt``, ``subject``, ``target_new``) and the token
  ids and lookup positions of its rewriting and KL prompts (so a different
  tokenizer misses);
- :data:`FORMAT_VERSION`.

A sequential series resumed on another machine re-applies the batches a stopped run
finished; the weights it reaches may differ from the recorded ones by float rounding, so
their fingerprint differs too. Within :func:`recorded_as` the weights are keyed under
the fingerprint the series recorded for them (``scale``'s step cells), and the anchors
banked for the recorded weights are served to the re-applied ones.

Left out on purpose: ``anchor_batch_size`` and the loop variant (from the anchor
layer or full forward). Both only change float rounding (batched vs per-request
anchors agree to about 1e-3 of the delta norm, see ``tests/test_anchor.py``), so
an anchor computed in any chunk is served to any other.

Two layers hold entries under these keys:

- **in process** (:func:`in_process`): within the block, the anchors made or read on
  the weights the block was opened on (``compare`` and ``scale``: the unedited model)
  stay in memory, so other constructions and algorithms with the same objective reuse
  them, with or without the disk store;
- **on disk** (:class:`AnchorStore`, ``hparams.anchor_cache``): files
  ``<root>/<2 hex>/<digest>.safetensors`` with ``<root>`` =
  ``$EASYEDIT_REPLAY_ANCHOR_CACHE`` or ``cache_root()/"anchors"``; tensors ``init [S,
  d]`` (model dtype), ``delta [S, d]`` (float32), ``nll []`` and ``steps []``; the
  metadata holds the digest and the full key description, both checked on read.
  Writes are atomic (temporary file + rename) under a file lock
  (:func:`easyedit_replay.files.atomic_write`). A file that is unreadable or whose
  key, shapes or values do not match is reported with ``logging.warning`` naming the
  file, recomputed and replaced, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .objective import OBJECTIVE_FIELDS, Objective, Row

log = logging.getLogger(__name__)

FORMAT_VERSION = "easyedit-replay-anchor-1"
ENV_DIR = "EASYEDIT_REPLAY_ANCHOR_CACHE"

# model -> {parameter name: ((id, data_ptr, _version), digest)}
_PARAM_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# fingerprint of weights as they are -> the recorded fingerprint they stand for (recorded_as)
_RECORDED: Dict[str, str] = {}


def anchor_cache_dir() -> Path:
    """Folder of the anchor cache: ``$EASYEDIT_REPLAY_ANCHOR_CACHE`` or ``cache_root()/"anchors"``
    (``cache_root`` honours ``$EASYEDIT_REPLAY_CACHE``)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser().resolve()
    from ..paths import cache_root

    return cache_root() / "anchors"


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()


def model_fingerprint(model) -> str:
    """Hex digest of every parameter of ``model`` (names, shapes, dtypes, bytes).

    Each parameter's blake2b digest is memoized per model on ``(id, data_ptr,
    _version)``: repeated calls in one process re-hash only parameters written
    since (an in-place write such as ``w[...] += u`` or ``p.copy_(x)`` bumps
    ``_version``; a write through ``p.data`` does NOT, so call
    :func:`forget_fingerprints` after such writes, or turn the cache off).
    """
    memo = _PARAM_DIGESTS.setdefault(model, {})
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        state = (id(p), p.data_ptr(), p._version)
        hit = memo.get(name)
        if hit is None or hit[0] != state:
            hit = memo[name] = (state, _tensor_digest(p))
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{hit[1]};".encode())
    return h.hexdigest()


def forget_fingerprints(model=None) -> None:
    """Drop the memoized parameter digests (of ``model``, or of every model)."""
    if model is None:
        _PARAM_DIGESTS.clear()
    else:
        _PARAM_DIGESTS.pop(model, None)


def anchor_fingerprint(model) -> str:
    """The fingerprint that keys anchors of ``model``'s weights as they are now: the one
    an open :func:`recorded_as` block gives them, else :func:`model_fingerprint`."""
    actual = model_fingerprint(model)
    return _RECORDED.get(actual, actual)


@contextmanager
def recorded_as(model, fingerprint: Optional[str]) -> Iterator[bool]:
    """Within the block, key the anchors of ``model``'s weights as they are at entry under
    ``fingerprint`` (a fingerprint a run recorded for these weights, made on another
    machine or build where float rounding gave other bytes), so the anchors banked for the
    recorded weights are served to these. Weights written inside the block (a later batch)
    are keyed by their own fingerprint again. ``fingerprint`` None (nothing hashed) or
    equal to the weights' own: no change. Blocks nest; leaving one restores the alias the
    enclosing block gave. Yields whether the key was changed.

    The alias is a promise by the caller that these weights ARE the recorded ones up to
    float rounding: ``scale`` gives it only while every re-applied step of a sequential
    series matched its cell (:func:`~easyedit_replay.experiments.scale.redo_drift`;
    :func:`~easyedit_replay.experiments.runner.edit_in_batches`, ``recorded``)."""
    if fingerprint is None:
        yield False
        return
    actual = model_fingerprint(model)
    if fingerprint == actual:
        yield False
        return
    previous = _RECORDED.get(actual)
    _RECORDED[actual] = fingerprint
    try:
        yield True
    finally:
        if previous is None:
            _RECORDED.pop(actual, None)
        else:
            _RECORDED[actual] = previous


def _config_json(model) -> str:
    config = getattr(model, "config", None)
    data = config.to_dict() if hasattr(config, "to_dict") else {}
    data = {k: v for k, v in data.items() if k not in ("_name_or_path", "name_or_path")}
    return json.dumps(data, sort_keys=True, default=str)


@dataclass(frozen=True)
class ModelIdentity:
    """The part of an anchor's key that names the model: ``fingerprint``
    (:func:`anchor_fingerprint`: :func:`model_fingerprint`, or the recorded one inside
    :func:`recorded_as`), ``config`` (a digest of the config without its path),
    ``dtype`` and ``device`` (type) of its first parameter."""

    fingerprint: str
    config: str
    dtype: str
    device: str

    @classmethod
    def of(cls, model) -> "ModelIdentity":
        """The identity of ``model`` as its weights are now (the fingerprint
        :func:`anchor_fingerprint`: a recorded one inside :func:`recorded_as`)."""
        param = next(model.parameters())
        return cls(anchor_fingerprint(model), hashlib.blake2b(_config_json(model).encode(), digest_size=16).hexdigest(),
                   str(param.dtype), param.device.type)


@dataclass
class CacheKey:
    """One request's key: ``digest`` (file name) and ``description`` (JSON, stored in the file)."""

    digest: str
    description: str


def request_description(req) -> Dict[str, str]:
    """The part of an anchor's key that names its request (a prepared request's ``prompt``,
    ``subject`` and ``target_new``)."""
    return {"prompt": req.prompt, "subject": req.subject, "target_new": req.target_new}


def request_keys(model: ModelIdentity, objective: Objective, requests,
                 rows_by_request: Sequence[Sequence[Row]]) -> List[CacheKey]:
    """One :class:`CacheKey` per request (see the module docstring for what is keyed): the
    one key definition of the in-process layer, the disk store and the anchor banks.

    Args:
        model: the identity of the model the anchors are optimized on.
        objective: the anchor objective.
        requests: ``R`` prepared :class:`~easyedit_replay.prompts.EditRequest`.
        rows_by_request: per request, its rows
            (:func:`~easyedit_replay.anchors.objective.rows_by_request`).
    """
    common = {
        "format": FORMAT_VERSION,
        "model": model.fingerprint,
        "config": model.config,
        "dtype": model.dtype,
        "device": model.device,
        "layer": int(objective.layer),
        "sites": list(objective.sites),
        "loss_module": objective.loss_name,
        "hparams": {f: getattr(objective, f) for f in OBJECTIVE_FIELDS},
        "nll_factor": float(objective.nll_factor),
        "adaptive_nll": bool(objective.adaptive_nll),
        "early_stop": float(objective.early_stop),
        "templates": [list(g) for g in objective.templates],
    }
    keys = []
    for req, rows in zip(requests, rows_by_request):
        desc = dict(common, request=request_description(req),
                    rows=[[list(row.ids), int(row.lookup), bool(row.kl)] for row in rows])
        text = json.dumps(desc, sort_keys=True, default=str)
        keys.append(CacheKey(hashlib.blake2b(text.encode(), digest_size=20).hexdigest(), text))
    return keys


@dataclass
class Entry:
    """One request's cached anchor: ``init``/``delta`` ``[S, d]``, ``nll`` and ``steps`` scalars."""

    init: torch.Tensor
    delta: torch.Tensor
    nll: torch.Tensor
    steps: torch.Tensor


class AnchorStore:
    """Per-request anchor files under ``root`` (default :func:`anchor_cache_dir`)."""

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root is not None else anchor_cache_dir()

    def path(self, key: CacheKey) -> Path:
        """``<root>/<first 2 hex digits>/<digest>.safetensors``."""
        return self.root / key.digest[:2] / f"{key.digest}.safetensors"

    def get(self, key: CacheKey, n_sites: int, hidden: int, dtype: torch.dtype) -> Optional[Entry]:
        """The entry stored for ``key``, or None when absent. A file that cannot be read or
        does not match ``key`` (stored digest or description, shapes ``[n_sites, hidden]``,
        ``init`` dtype, finite values) is reported with ``logging.warning`` and ignored
        (the caller recomputes and :meth:`put` replaces it)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # corrupt or truncated file: any reader error
            log.warning("anchor cache file %s is unreadable (%s: %s); recomputing and replacing it",
                        path, type(exc).__name__, exc)
            return None
        problem = _mismatch(key, meta, tensors, n_sites, hidden, dtype)
        if problem:
            log.warning("anchor cache file %s does not match (%s); recomputing and replacing it", path, problem)
            return None
        return Entry(tensors["init"], tensors["delta"], tensors["nll"], tensors["steps"])

    def stored(self) -> Iterator[Tuple[Path, dict, int]]:
        """``(path, key description, optimization steps)`` of every anchor file under
        ``root``: the key from the files' metadata, the steps from the one scalar tensor
        ``steps`` (the anchors themselves are not loaded; nothing is validated)."""
        from safetensors import safe_open

        for path in sorted(self.root.glob("*/*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                yield path, json.loads((f.metadata() or {})["key"]), int(f.get_tensor("steps"))

    def put(self, key: CacheKey, entry: Entry) -> Path:
        """Write ``entry`` for ``key`` atomically under a file lock; returns the path."""
        from safetensors.torch import save_file

        from ..files import atomic_write

        tensors = {
            "init": entry.init.detach().cpu().contiguous(),
            "delta": entry.delta.detach().float().cpu().contiguous(),
            "nll": entry.nll.detach().float().cpu().reshape(()).contiguous(),
            "steps": entry.steps.detach().long().cpu().reshape(()).contiguous(),
        }
        meta = {"format": FORMAT_VERSION, "digest": key.digest, "key": key.description}
        path = self.path(key)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), suffix=".tmp.safetensors")
        return path


def _mismatch(key: CacheKey, meta: dict, tensors: dict, n_sites: int, hidden: int, dtype) -> Optional[str]:
    """What makes a stored file unusable for ``key``, or None."""
    if meta.get("format") != FORMAT_VERSION:
        return f"format {meta.get('format')!r}, expected {FORMAT_VERSION!r}"
    if meta.get("digest") != key.digest or meta.get("key") != key.description:
        return "its stored key does not match the request's key"
    if sorted(tensors) != ["delta", "init", "nll", "steps"]:
        return f"tensors {sorted(tensors)}, expected delta, init, nll, steps"
    if tuple(tensors["init"].shape) != (n_sites, hidden) or tuple(tensors["delta"].shape) != (n_sites, hidden):
        return f"shapes {tuple(tensors['init'].shape)}/{tuple(tensors['delta'].shape)}, expected ({n_sites}, {hidden})"
    if tensors["init"].dtype != dtype or tensors["delta"].dtype != torch.float32:
        return f"dtypes {tensors['init'].dtype}/{tensors['delta'].dtype}, expected {dtype}/torch.float32"
    if not (torch.isfinite(tensors["init"]).all() and torch.isfinite(tensors["delta"]).all()):
        return "non-finite values"
    return None


# ----------------------------------------------------------------------------- in process


class MemoryLayer:
    """Entries kept in this process under their :class:`CacheKey`, for the weights whose
    :func:`anchor_fingerprint` is ``fingerprint`` (anchors of other weights are neither
    served nor kept)."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint
        self.entries: Dict[str, Tuple[str, Entry]] = {}  # digest -> (description, entry)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: CacheKey) -> Optional[Entry]:
        """The entry kept for ``key``, or None."""
        kept = self.entries.get(key.digest)
        return kept[1] if kept is not None and kept[0] == key.description else None

    def put(self, key: CacheKey, entry: Entry) -> None:
        """Keep ``entry`` under ``key``."""
        self.entries[key.digest] = (key.description, entry)


_ACTIVE: List[MemoryLayer] = []  # the open in_process blocks, innermost last


@contextmanager
def in_process(model) -> Iterator[MemoryLayer]:
    """Within the block, anchors optimized or read on ``model``'s weights as they are now
    (its :func:`anchor_fingerprint` at entry) are kept in memory under their cache keys and
    served from there before the disk store is asked, also with the disk store off
    (``compare`` and ``scale`` share the unedited model's anchors across constructions and
    algorithms this way). Anchors of other weights (later batches of a sequential run) are
    not kept. Yields the :class:`MemoryLayer` (empty; entries can be put in ahead).
    Blocks nest; the innermost whose weights match is used."""
    layer = MemoryLayer(anchor_fingerprint(model))
    _ACTIVE.append(layer)
    try:
        yield layer
    finally:
        _ACTIVE.remove(layer)


def memory_active() -> bool:
    """Whether an :func:`in_process` block is open."""
    return bool(_ACTIVE)


class AnchorCache:
    """The cache one anchor optimization reads and writes: the in-process layer for its
    model's weights (``memory``, when an :func:`in_process` block for them is open) in front
    of the disk store (``disk``, when on). Either may be None."""

    def __init__(self, memory: Optional[MemoryLayer], disk: Optional[AnchorStore]):
        self.memory, self.disk = memory, disk

    @classmethod
    def open(cls, model: ModelIdentity, disk: bool) -> "AnchorCache":
        """The layers for anchors of ``model``: the innermost matching in-process layer, and
        the disk store at :func:`anchor_cache_dir` when ``disk``."""
        memory = next((m for m in reversed(_ACTIVE) if m.fingerprint == model.fingerprint), None)
        return cls(memory, AnchorStore() if disk else None)

    def __bool__(self) -> bool:
        return self.memory is not None or self.disk is not None

    def __str__(self) -> str:
        return " + ".join((["in process"] if self.memory is not None else []) +
                          ([str(self.disk.root)] if self.disk is not None else []))

    def lookup(self, keys: Sequence[CacheKey], n_sites: int, hidden: int, dtype: torch.dtype) -> Dict[int, Entry]:
        """``{request index: entry}`` for the keys found in memory, else on disk (valid files
        only, :meth:`AnchorStore.get`: ``init``/``delta`` ``[n_sites, hidden]``, ``init`` of
        ``dtype``); what the disk gives is kept in memory too."""
        found = {}
        for i, key in enumerate(keys):
            entry = self.memory.get(key) if self.memory is not None else None
            if entry is None and self.disk is not None:
                entry = self.disk.get(key, n_sites, hidden, dtype)
                if entry is not None and self.memory is not None:
                    self.memory.put(key, entry)
            if entry is not None:
                found[i] = entry
        return found

    def put(self, key: CacheKey, entry: Entry) -> None:
        """Keep ``entry`` in memory and write it to disk (each when on)."""
        if self.memory is not None:
            self.memory.put(key, entry)
        if self.disk is not None:
            self.disk.put(key, entry)


def split_result(init: torch.Tensor, delta: torch.Tensor, nll: torch.Tensor, steps: torch.Tensor) -> List[Entry]:
    """Per-request entries of a chunk's ``init``/``delta [S, R, d]``, ``nll``/``steps [R]``."""
    return [Entry(init[:, r], delta[:, r], nll[r], steps[r]) for r in range(delta.shape[1])]


def stack_entries(entries: Sequence[Entry], device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``init [S, R, d]`` and ``delta [S, R, d]`` on ``device``, ``nll [R]`` float32 and ``steps [R]``
    long on the CPU, from per-request entries in request order."""
    init = torch.stack([e.init.to(device) for e in entries], 1)
    delta = torch.stack([e.delta.to(device=device, dtype=torch.float32) for e in entries], 1)
    nll = torch.stack([e.nll.float().cpu().reshape(()) for e in entries])
    steps = torch.stack([e.steps.long().cpu().reshape(()) for e in entries])
    return init, delta, nll, steps
