"""AlphaEdit's update rule (Fang et al., 2025, "AlphaEdit: Null-space constrained
knowledge editing"; EasyEdit ``alphaedit/AlphaEdit_main``).

Per edit layer, in float32 as stock:

- ``P``: projection onto the span of the eigenvectors of the key second moment ``C``
  whose eigenvalues are below ``nullspace_threshold`` (the "null space" of the
  preserved keys). Stock: ``U, S = svd(C)``; ``P = U_s U_s^T`` for ``S < threshold``.
- ``dW^T = (P (K K^T + cache) + L2 I)^-1 P K R^T`` with ``R = error / (n - i)``
  (``torch.linalg.solve``), ``cache`` the sum of ``K K^T`` of earlier edits of the
  same model (sequential editing).
- After the batch, ``cache += K K^T`` for every edit layer (stock recomputes the keys
  with every update written; a layer's keys do not depend on its own or later
  layers' down-projections, so the keys used for its update are the same values).
- ``sequential_keys: rekeyed`` (ours, off by default): ``cache`` in the solve is
  replaced by ``sum K_old K_old^T`` of the earlier edits' keys re-read on the current
  model (:mod:`easyedit_replay.sequential`); the stock cache is still kept.
- ``sequential_refresh`` (ours, off by default): the earlier edits of the model's
  sequential record join ``K`` and ``R`` as rows restoring the states they reached
  (multiplied by ``sqrt(w)``, ``w = sequential_refresh_weight``, when ``w != 1``: ``P (K
  K^T + w K_old K_old^T + U)``, ``P (K R^T + w K_old R_old^T)``), and in the solve
  ``cache`` is replaced by its untracked part ``U``: the ``K K^T`` of the cached edits
  the record does not hold (edits made before the record began, or batches left out
  of it), so the recorded edits are not counted twice and the others keep their
  protection. ``U`` is the cache as it was before the first recorded batch,
  plus the keys of later batches that did not join the record; with nothing untracked
  the solve is that of ``K K^T`` alone, bit for bit. The cache kept for later batches
  grows by this batch's own keys only.

What differs from stock, on purpose:

- ``P`` is cached on disk next to the statistics it comes from
  (:func:`projection_path`: keyed by model, module, statistics identity and
  threshold), written atomically under a file lock; stock writes
  ``null_space_project.pt`` into the working directory. An existing file at
  ``P_loc`` (stock layout: ``[len(layers), d, d]``) is honoured.
- The sequential cache belongs to the edited model object (a weak-keyed store),
  not to the process; each weight's cache is sized from the statistics of that
  weight, never from the model name. It is updated only by a successful edit
  (``commit``), can be reset with ``reset_cache=True`` (as stock; applied
  atomically with the edit) or :func:`reset_alphaedit_cache`, and is not updated
  for ``sequential_edit=False``. EasyEdit's editor does not pass
  ``sequential_edit`` to the algorithm and restores the weights after each
  non-sequential edit; so when the weights are found back at their state before
  the last cached edit (or before the first), the cache is rolled back to match.
  The untracked part (:func:`alphaedit_untracked`) is kept and rolled back with it.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import HyperParamsError, StatisticsError, field_error
from ..files import atomic_write
from ..hparams import ReplayHyperParams, is_number
from ..sequential import recorded_batches
from ..sequential import weight_fingerprint as _fingerprint
from ..stats import module_stats_path
from ..tracing import resolve_parameter
from .base import Algorithm, UpdateInputs

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class AlphaEditHyperParams(ReplayHyperParams):
    """EasyEdit's ``AlphaEditHyperParams`` fields plus the replay fields.

    ``nullspace_threshold``: eigenvalues of ``C`` below it span the preserved-key
    null space (stock 2e-2). ``L2``: ridge term of the solve (stock 1 or 10).
    ``P_loc``: optional path of a precomputed ``[len(layers), d, d]`` projection
    tensor (stock's ``null_space_project.pt``); used when the file exists,
    otherwise ``P`` is computed and cached under ``stats_dir``.
    """

    nullspace_threshold: float
    L2: float
    P_loc: Optional[str] = None


    def validate(self) -> None:
        """Base checks plus ``nullspace_threshold``, ``L2`` and ``P_loc``.

        Raises:
            HyperParamsError: a base field (:meth:`ReplayHyperParams.validate`),
                ``nullspace_threshold`` or ``L2`` not a positive number, or ``P_loc``
                neither a string nor null.
        """
        super().validate()
        if not is_number(self.nullspace_threshold) or self.nullspace_threshold <= 0:
            raise field_error(HyperParamsError, "nullspace_threshold", self.nullspace_threshold,
                              "must be a positive number (stock: 2e-2)")
        if not is_number(self.L2) or self.L2 <= 0:
            raise field_error(HyperParamsError, "L2", self.L2,
                              "must be a positive number (stock: 1 or 10); P (K K^T + cache) alone is singular")
        if self.P_loc is not None and not isinstance(self.P_loc, str):
            raise field_error(HyperParamsError, "P_loc", self.P_loc, "must be a file path or null")


# ----------------------------------------------------------------------------- projection


def null_space_projection(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P = U_s U_s^T`` for the singular vectors of ``cov`` with singular value < ``threshold``.

    Args:
        cov: ``[d, d]`` symmetric second moment (float32, as stock).

    Returns:
        ``[d, d]`` float32 orthogonal projection (zero when no value is below the
        threshold).

    Source: EasyEdit ``AlphaEdit_main.get_project`` (``torch.linalg.svd`` of the
    float32 covariance on the CPU).
    """
    u, s, _ = torch.linalg.svd(cov.float().cpu(), full_matrices=False)
    small = (s < threshold).nonzero(as_tuple=True)[0]
    return u[:, small] @ u[:, small].T


def projection_path(model, hparams, module: str, stats_dir=None) -> Path:
    """Cache file of ``P`` for ``module``: the statistics file's name with
    ``_nullspace{threshold}.pt`` instead of ``.npz``, in the same folder."""
    stats = module_stats_path(model, hparams, module, stats_dir)
    return stats.with_name(f"{stats.stem}_nullspace{float(hparams.nullspace_threshold)!r}.pt")


def _load_tensor(path: Path, what: str) -> torch.Tensor:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated, not a tensor file
        raise StatisticsError(f"{what} {path} is unreadable ({exc}); delete it to recompute") from exc
    if not isinstance(value, torch.Tensor):
        raise StatisticsError(f"{what} {path} holds a {type(value).__name__}, not a tensor; delete it to recompute")
    return value


def projections(model, hparams, covs: Dict[str, torch.Tensor], stats_dir=None) -> Dict[str, torch.Tensor]:
    """``{module: P [d_in, d_in] float32}`` for every edit layer's rewrite module (EasyEdit
    ``AlphaEdit_main.get_project`` via :func:`null_space_projection`, cached on disk).

    ``P_loc`` (when the file exists) wins; else each module's cached file under
    ``stats_dir``; else computed from ``covs`` and written there.

    Raises:
        StatisticsError: a ``P_loc`` or cache file that is unreadable or whose shape
            does not fit the layers / weights.
    """
    modules = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
    if hparams.P_loc and Path(hparams.P_loc).exists():
        stacked = _load_tensor(Path(hparams.P_loc), "hparams.P_loc")
        dims = {covs[m].shape[0] for m in modules}
        if stacked.ndim != 3 or stacked.shape[0] != len(modules) or len(dims) != 1 \
                or tuple(stacked.shape[1:]) != (dims.pop(),) * 2:
            raise StatisticsError(
                f"hparams.P_loc = {hparams.P_loc!r} holds a tensor of shape {tuple(stacked.shape)}; expected "
                f"[{len(modules)}, d, d] for layers {list(hparams.layers)} with d = {covs[modules[0]].shape[0]}; "
                f"point P_loc to a file made for this model and these layers, or to a missing path to compute P"
            )
        log.info("AlphaEdit: projections read from P_loc %s", hparams.P_loc)
        return {m: stacked[i].float() for i, m in enumerate(modules)}
    result = {}
    for m in modules:
        d = covs[m].shape[0]
        path = projection_path(model, hparams, m, stats_dir)
        if path.exists():
            p = _load_tensor(path, "projection cache")
            if tuple(p.shape) != (d, d):
                raise StatisticsError(f"projection cache {path} has shape {tuple(p.shape)}, expected ({d}, {d}); "
                                      f"delete it to recompute")
        else:
            p = null_space_projection(covs[m], hparams.nullspace_threshold)
            atomic_write(path, lambda tmp, p=p: torch.save(p, tmp), suffix=".tmp.pt")
            rank = int(round(float(torch.trace(p))))
            log.info("AlphaEdit: %s null space has %d of %d dimensions (threshold %g); cached at %s",
                     m, rank, d, hparams.nullspace_threshold, path)
            if rank == 0:
                log.warning("AlphaEdit: no eigenvalue of the %s statistics is below nullspace_threshold=%g; "
                            "every update at this layer is zero. Raise nullspace_threshold.", m, hparams.nullspace_threshold)
        result[m] = p.float()
    return result


# ----------------------------------------------------------------------------- sequential cache


@dataclass
class _LayerCache:
    """Sequential-edit state of one rewritten weight of one model (tensors on the CPU)."""

    cache: torch.Tensor                        # [d_in, d_in] float32: sum of K K^T of committed edits
    origin: Tuple[float, float]                # weight fingerprint before the first cached edit
    before: Tuple[float, float]                # ... before the last cached edit
    after: Tuple[float, float]                 # ... after it
    previous: torch.Tensor = field(repr=False)  # cache before the last cached edit
    # [d_in, d_in] float32 part of ``cache`` the sequential record does not hold (None: zero),
    # after the last cached edit and before it; may be the same tensor as ``cache``/``previous``
    untracked: Optional[torch.Tensor] = field(default=None, repr=False)
    previous_untracked: Optional[torch.Tensor] = field(default=None, repr=False)


_CACHES: "weakref.WeakKeyDictionary[Any, Dict[str, _LayerCache]]" = weakref.WeakKeyDictionary()


def reset_alphaedit_cache(model=None) -> None:
    """Forget the sequential-edit key cache of ``model`` (of every model when None)."""
    if model is None:
        _CACHES.clear()
    else:
        _CACHES.pop(model, None)


def alphaedit_cache(model) -> Dict[str, torch.Tensor]:
    """``{weight_name: cache [d_in, d_in]}`` of ``model`` (a copy; empty when none)."""
    return {name: entry.cache.clone() for name, entry in _CACHES.get(model, {}).items()}


def alphaedit_untracked(model) -> Dict[str, torch.Tensor]:
    """The untracked part of ``model``'s sequential cache: what ``sequential_refresh``
    solves with in place of the cache.

    Returns:
        ``{weight_name: [d_in, d_in] float32}`` (CPU copies): per rewritten weight, the sum of
        ``K K^T`` over the cached edits that the model's sequential record
        (:mod:`easyedit_replay.sequential`) does not hold: the cache before the first
        recorded batch plus the keys of later batches left out of the record; the whole
        cache while the record holds no batch (none kept, or
        :func:`~easyedit_replay.sequential.reset_sequential_state`). Weights whose
        untracked part is zero are left out: a sequence recorded from its first edit gives
        ``{}``. As the last committed edit left it (like :func:`alphaedit_cache`, not
        rolled back to restored weights; the next edit does that).

    Source: this project (AlphaEdit's ``cache_c`` split by the sequential record).
    """
    covered = recorded_batches(model) > 0
    out = {}
    for name, entry in _CACHES.get(model, {}).items():
        part = entry.untracked if covered else _nonzero(entry.cache)
        if part is not None:
            out[name] = part.clone()
    return out


def _nonzero(value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``value``, or None when it is None or all zeros (no term to add: the solve stays bit-identical)."""
    return value if value is not None and bool(torch.any(value)) else None


def _current_cache(model, weight_name: str, d: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The cache to use for ``weight_name`` now and its untracked part (None: zero), rolled
    back when the weights were restored."""
    entry = _CACHES.get(model, {}).get(weight_name)
    if entry is None:
        return torch.zeros(d, d), None
    if entry.cache.shape != (d, d):
        log.warning("AlphaEdit: cached keys of %s have shape %s, the weight takes %d inputs; starting a new cache",
                    weight_name, tuple(entry.cache.shape), d)
        return torch.zeros(d, d), None
    now = _fingerprint(resolve_parameter(model, weight_name))
    if now == entry.after:
        return entry.cache, entry.untracked
    if now == entry.origin:
        log.info("AlphaEdit: %s is back at its state before the first cached edit; the key cache starts empty", weight_name)
        return torch.zeros(d, d), None
    if now == entry.before:
        log.info("AlphaEdit: %s is back at its state before the last edit (restored); its keys leave the cache", weight_name)
        return entry.previous, entry.previous_untracked
    log.debug("AlphaEdit: %s changed since the last cached edit; keeping the cache", weight_name)
    return entry.cache, entry.untracked


@dataclass
class AlphaEditState:
    """One batch's AlphaEdit state, per rewritten weight (all ``[d_in, d_in]`` float32
    but ``keys``, ``[d_in, m]``): the null-space projections ``P``, the key caches in
    use (``cache``) and their parts the sequential record does not hold (``untracked``,
    None where zero; the solve's cache under ``sequential_refresh``), the weight
    fingerprints before the batch (``before``), and the keys of this batch (``keys``,
    filled by :meth:`AlphaEdit.update`). ``commit``: store the new caches after a
    successful edit (EasyEdit's ``sequential_edit``)."""

    P: Dict[str, torch.Tensor]
    cache: Dict[str, torch.Tensor]
    before: Dict[str, Tuple[float, float]]
    commit: bool = True
    keys: Dict[str, torch.Tensor] = field(default_factory=dict)
    untracked: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)


@dataclass
class PendingCaches:
    """What :meth:`AlphaEdit.commit` stores once the edit succeeded."""

    model_caches: Dict[str, torch.Tensor]   # cache + K K^T per weight
    used: Dict[str, torch.Tensor]           # the caches the batch was solved with
    before: Dict[str, Tuple[float, float]]  # weight fingerprints before the batch
    # the untracked parts after the batch and before it (None: zero); see AlphaEdit.finalize
    untracked: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)
    used_untracked: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)


class AlphaEdit(Algorithm):
    name = "AlphaEdit"
    hparams_class = AlphaEditHyperParams
    keeps_edit_time_keys = True

    def prepare(self, model, tok, hp, covs, options) -> AlphaEditState:
        """Projections and the model's current key caches (``reset_cache=True``: empty).

        ``covs``: ``{module: [d_in, d_in]}`` second moments; ``options``: the ``apply_*``
        keyword arguments (``reset_cache``, ``sequential_edit``, ``stats_dir``).

        Returns:
            :class:`AlphaEditState` with ``P``, ``cache`` (``[d_in, d_in]`` float32 each)
            and the weight fingerprints per rewritten weight.

        Raises:
            StatisticsError: from :func:`projections`, an unusable ``P_loc`` or cache file.

        Source: EasyEdit ``AlphaEdit_main`` (``P`` per layer, ``cache_c`` zeroed on
        ``reset_cache``); the per-model cache and its roll-back are ours.
        """
        reset = bool(options.get("reset_cache", False))
        P = projections(model, hp, covs, options.get("stats_dir"))
        state = AlphaEditState({}, {}, {}, commit=options.get("sequential_edit", True) is not False)
        for layer in hp.layers:
            module = hp.rewrite_module_tmp.format(layer)
            wname = f"{module}.weight"
            d = covs[module].shape[0]
            state.P[wname] = P[module]
            state.cache[wname], state.untracked[wname] = (torch.zeros(d, d), None) if reset \
                else _current_cache(model, wname, d)
            state.before[wname] = _fingerprint(resolve_parameter(model, wname))
        return state

    def update(self, inp: UpdateInputs) -> torch.Tensor:
        """``solve(P (K K^T + cache) + L2 I, P K R^T)``: ``[d_in, d_out]`` float32 (stock layout;
        the editor transposes it onto the weight). With ``inp.protected`` (re-keyed
        protection) that Gram matrix, in float32, stands in for ``cache``. With
        ``inp.restored`` (``sequential_refresh``) the recorded earlier edits are the last
        columns of ``K`` and ``R`` (already multiplied by ``sqrt(sequential_refresh_weight)``
        by the editor when that is not 1), and ``cache`` is replaced by its untracked part ``U``
        (``state.untracked``: the cached ``K K^T`` of edits the sequential record does not
        hold); the recorded edits' edit-time keys leave the solve, which holds them at
        their current keys. With no untracked part nothing is added (bit-identical to
        ``solve(P K K^T + L2 I, P K R^T)``). The cache kept for later batches still adds
        only this batch's own ``K K^T`` (the first ``m - restored`` columns).

        Shapes: ``inp.keys [d_in, m]``, ``inp.error [d_out, m]``, ``P`` and ``cache``
        ``[d_in, d_in]``. Mirrors EasyEdit ``AlphaEdit_main.apply_AlphaEdit_to_model``
        (``torch.linalg.solve`` of the paper's closed form, Fang et al., 2025).

        Raises:
            torch.linalg.LinAlgError: from ``torch.linalg.solve`` (not caught here).
        """
        st: AlphaEditState = inp.state
        dev = inp.device
        proj = st.P[inp.weight_name].to(dev).float()
        keys = inp.keys.to(dev).float()
        resid = inp.error.to(dev).float() / inp.divisor
        gram = keys @ keys.T
        if not inp.restored:
            gram = gram + (st.cache[inp.weight_name] if inp.protected is None else inp.protected).to(dev).float()
        else:  # sequential_refresh: the recorded edits are rows of this solve at their current keys, so only
            # the cache's untracked part stays (the recorded part would count them twice)
            untracked = st.untracked.get(inp.weight_name)
            if untracked is not None:
                gram = gram + untracked.to(dev).float()
        st.keys[inp.weight_name] = keys[:, :keys.shape[1] - inp.restored].detach().cpu()  # this batch's own keys
        eye = torch.eye(keys.shape[0], dtype=proj.dtype, device=dev)
        return torch.linalg.solve(proj @ gram + inp.hparams.L2 * eye, proj @ keys @ resid.T)

    def capacity(self, keys, cov, hp, state: AlphaEditState, weight_name) -> torch.Tensor:
        """``q = k^T B^{-1} P k`` with ``B = P cache + L2 I``: by Sherman-Morrison, the
        solve ``(B + P k k^T)^{-1} P k r^T`` of one key realizes ``q / (1 + q)`` of ``r``
        (``k^T P k / L2`` with an empty cache).

        Args:
            keys: ``[d_in, m]`` keys; ``state.P`` / ``state.cache`` at ``weight_name``:
                ``[d_in, d_in]``.

        Returns:
            ``[m]`` float64 capacities (computed in float32, as the stock solve).

        Source: ours (Sherman-Morrison on EasyEdit AlphaEdit's solve), for the
        ``replay_capacity`` construction.
        """
        keys = keys.float()
        proj = state.P[weight_name].to(keys.device).float()
        cache = state.cache[weight_name].to(keys.device).float()
        b = proj @ cache + hp.L2 * torch.eye(keys.shape[0], dtype=keys.dtype, device=keys.device)
        return (keys * torch.linalg.solve(b, proj @ keys)).sum(dim=0).double()

    def finalize(self, model, tok, hp, state: AlphaEditState, context) -> Optional[PendingCaches]:
        """The caches after this batch (``cache + K K^T`` per rewritten weight) and their
        untracked parts, stored by :meth:`commit`.

        ``context["sequential"]`` (the batch's
        :class:`~easyedit_replay.sequential.SequentialContext`, from the editor) splits
        the cache: while the record holds no earlier batch the whole cache in use is
        untracked (the first recorded batch keeps it as the untracked part: a snapshot of
        the cache before the record began); a batch that joins the record keeps the
        untracked part as it was, one left out of it adds its ``K K^T``. Without a
        context the batch counts as unrecorded and the whole cache as untracked.

        Returns:
            :class:`PendingCaches` (every cache ``[d_in, d_in]`` float32, from this batch's
            keys ``[d_in, m]``), or None when ``state.commit`` is False
            (``sequential_edit=False``).

        Source: EasyEdit ``AlphaEdit_main`` (``cache_c += K K^T`` after the batch); the
        untracked split is ours.
        """
        if not state.commit:
            return None
        seq = (context or {}).get("sequential")
        recorded = seq is not None and seq.record
        covered = seq is not None and bool(seq.batches)  # the record holds earlier batches of this model
        caches, untracked, used_untracked = {}, {}, {}
        for w, k in state.keys.items():
            own = k @ k.T
            caches[w] = new = state.cache[w] + own
            used_untracked[w] = part = state.untracked.get(w) if covered else _nonzero(state.cache[w])
            if recorded:
                untracked[w] = part
            elif not covered:  # the whole cache is untracked (the same tensor)
                untracked[w] = new
            else:
                untracked[w] = own if part is None else part + own
        return PendingCaches(caches, state.cache, state.before, untracked, used_untracked)

    def commit(self, model, hp, pending: Optional[PendingCaches]) -> None:
        """Store ``pending``'s caches as ``model``'s sequential key cache (nothing when None),
        with the weight fingerprints before and after the edit so a later batch can roll
        the cache back if EasyEdit restored the weights. Only called after a successful
        edit (EasyEdit ``AlphaEdit_main`` updates ``cache_c`` in place; ours keeps it per
        model)."""
        if pending is None:
            return
        store = _CACHES.setdefault(model, {})
        for wname, new in pending.model_caches.items():
            old = store.get(wname)
            before = pending.before[wname]
            used = pending.used[wname]
            fresh = old is None or not torch.any(used)
            store[wname] = _LayerCache(
                cache=new, origin=before if fresh else old.origin, before=before,
                after=_fingerprint(resolve_parameter(model, wname)), previous=used,
                untracked=pending.untracked[wname], previous_untracked=pending.used_untracked[wname],
            )
