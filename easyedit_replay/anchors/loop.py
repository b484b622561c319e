"""Anchor optimization at any layer, batched over requests and cached.

:func:`optimize_anchors` minimizes an :class:`~easyedit_replay.anchors.objective.Objective`
(EasyEdit's ``compute_z`` / ``compute_zs``) for every request: Adam with ``v_lr`` for
``v_num_grad_steps`` steps; after each step each delta is clamped to
``clamp_norm_factor * |h|``; a request stops when its loss drops below 0.05 (PMET: also
when the target is the argmax and the KL is <= 0.01).

Batching: the anchors of all requests of a chunk are optimized in one loop with
one forward/backward over all their prompts per step. Each request has its own
delta, its own loss term (the total is the SUM, so every delta sees exactly its
own gradient), its own clamp and its own early stop; Adam is elementwise, so the
result equals optimizing each request alone up to float rounding of the batched
forward pass. Requests that stopped are dropped from later forward passes and
their deltas are frozen.

Structure: :func:`optimize_anchors` (cache lookup, chunks, stacking) ->
:func:`optimize_chunk`, a loop over a :class:`~easyedit_replay.anchors.objective.Problem`,
:func:`_step` (one forward with deltas, :mod:`easyedit_replay.anchors.forward`, ->
per-request losses), :class:`Bookkeeping` (active requests, PMET's adaptive factor,
final NLL and steps) and :func:`_update` (Adam, freeze, clamp).

Speed: each step runs only the decoder layers from the anchor layer on
(:class:`~easyedit_replay.anchors.forward.LayerLoop`), checked against the full forward
pass at step 0 of every chunk. Anchors are cached per request
(:mod:`easyedit_replay.anchors.store`), so a rerun on the same edits and weights
optimizes nothing.

    objective = Objective.of(hparams, layer=4, site_templates=[hparams.layer_module_tmp],
                             templates=[["{}"]])
    anchors = optimize_anchors(model, tok, prepare_requests(records), objective)
    anchors.value            # [1, R, d]: compute_z's target per request
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, List, Optional, Sequence

import torch

from ..batching import input_device, pad_id_of
from ..errors import NumericalError
from ..model_info import hidden_size, max_positions
from ..prompts import EditRequest
from ..tracing import resolve_module
from . import store as store_mod
from .forward import DeltaForward, FastCheck, FullForward, LayerLoop, check_fast
from .objective import Batch, Objective, Problem, Readout, Row, StepLoss, pmet_signals, renumbered, rows_by_request

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 16  # hparams.anchor_batch_size's default


@dataclass
class AnchorResult:
    """Optimized anchors of ``R`` requests at ``S`` sites of one layer.

    Attributes:
        layer: the anchor layer.
        sites: formatted module names where the deltas are added (``S`` of them).
        init: ``[S, R, d]`` the sites' outputs at the lookup token of the bare prompt
            before editing (model dtype).
        delta: ``[S, R, d]`` float32 optimized deltas.
        nll: ``[R]`` per-token NLL of ``target_new`` (mean over context templates)
            at the final delta, as read at ``v_loss_layer``.
        steps: ``[R]`` forward passes used per request.
        fast_checks: one :class:`~easyedit_replay.anchors.forward.FastCheck` per chunk
            optimized with the loop from the anchor layer on (empty when every anchor
            came from the cache or the loop was off).
    """

    layer: int
    sites: List[str]
    init: torch.Tensor
    delta: torch.Tensor
    nll: torch.Tensor
    steps: torch.Tensor
    fast_checks: List[FastCheck] = field(default_factory=list)

    @property
    def value(self) -> torch.Tensor:
        """``init + delta`` in the model dtype: EasyEdit's ``target`` (MEMIT's z)."""
        return self.init + self.delta.to(device=self.init.device, dtype=self.init.dtype)


@contextmanager
def frozen_parameters(model):
    """Disable ``requires_grad`` on every parameter for the block; restore the flags after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class _Spec:
    """An objective resolved on a model: the model and tokenizer, the readout, and the
    dtype/device of the first site's parameters (the deltas and ``init`` live there)."""

    model: torch.nn.Module
    tok: object
    objective: Objective
    readout: Readout
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def resolve(cls, model, tok, objective: Objective) -> "_Spec":
        """Raises HyperParamsError for a site, loss layer or readout that names no module."""
        for name in list(objective.sites) + [objective.loss_name]:
            resolve_module(model, name, "layer_module_tmp")
        readout = Readout.of(model, objective.ln_f_module, objective.lm_head_module)
        param = next(resolve_module(model, objective.sites[0]).parameters(), None)
        dtype = param.dtype if param is not None else next(model.parameters()).dtype
        device = param.device if param is not None else input_device(model)
        return cls(model, tok, objective, readout, dtype, device)


def optimize_anchors(model, tok, requests: Sequence[EditRequest], objective: Objective, *,
                     chunk_size: int = DEFAULT_CHUNK, cache: bool = True, fast_loop: bool = True,
                     progress: bool = False) -> AnchorResult:
    """Optimize one anchor per request for ``objective`` (any layer), batched, cached.

    Args:
        requests: ``R`` prepared requests.
        objective: the anchor objective (layer, sites, context templates,
            hyperparameters; :meth:`Objective.of` or the algorithm's
            ``anchor_objective``).
        chunk_size: requests optimized together (``hparams.anchor_batch_size``); only
            requests not found in the cache are optimized, in chunks of this size, and
            each chunk is written as soon as it finishes.
        cache: read and write the disk store (``hparams.anchor_cache``,
            :mod:`easyedit_replay.anchors.store`). An open
            :func:`~easyedit_replay.anchors.store.in_process` block for the model's
            weights is read and written either way.
        fast_loop: run only the decoder layers from the anchor layer on in the
            optimization loop (the earlier states do not depend on the delta);
            checked against the full forward pass at step 0 of each chunk, with a
            fallback to the full pass (see :class:`LayerLoop`). False: always the
            full forward pass.

    Returns:
        :class:`AnchorResult` with ``init``/``delta`` of shape ``[S, R, d]``. A request
        found in the cache gets its stored anchor bit for bit; neither ``chunk_size``
        nor ``fast_loop`` is part of the key, since they only change float rounding.

    Raises:
        RequestError: a target that tokenizes to nothing, or prompts longer than the
            model's context.
        NumericalError: a non-finite loss or delta.
        HyperParamsError: a site, loss layer or readout module that names no module.

    Source: EasyEdit ``memit/compute_z.py::compute_z`` and ``pmet/compute_zs.py``.
    """
    spec = _Spec.resolve(model, tok, objective)
    rows_of = rows_by_request(tok, requests, objective, max_positions(model))
    layers, keys, found = None, None, {}
    if cache or store_mod.memory_active():
        identity = store_mod.ModelIdentity.of(model)
        keys = store_mod.request_keys(identity, objective, requests, rows_of)
        layers = store_mod.AnchorCache.open(identity, disk=cache)
        found = layers.lookup(keys, len(objective.sites), hidden_size(model), spec.dtype) if layers else {}
    missing = [r for r in range(len(requests)) if r not in found]
    entries = dict(found)

    def save(r: int, entry: store_mod.Entry) -> None:
        entries[r] = entry
        if layers:
            layers.put(keys[r], entry)

    checks = _optimize_in_chunks(spec, rows_of, missing, chunk_size, progress, fast_loop, save)
    if layers:
        log.info("anchors at layer %d: %d loaded from the cache, %d optimized (%s)",
                 objective.layer, len(found), len(missing), layers)
    init, delta, nll, steps = store_mod.stack_entries([entries[r] for r in range(len(requests))], spec.device)
    return AnchorResult(objective.layer, list(objective.sites), init, delta, nll, steps, checks)


def cache_keys(model, tok, requests: Sequence[EditRequest], objective: Objective) -> List[store_mod.CacheKey]:
    """The cache key of each request's anchor for ``objective`` on ``model`` as it is now:
    what :func:`optimize_anchors` looks up (e.g. to put anchors into an
    :func:`~easyedit_replay.anchors.store.in_process` layer ahead).

    Raises:
        RequestError: as :func:`optimize_anchors`.
    """
    rows_of = rows_by_request(tok, requests, objective, max_positions(model))
    return store_mod.request_keys(store_mod.ModelIdentity.of(model), objective, requests, rows_of)


def _optimize_in_chunks(spec: _Spec, rows_of: List[List[Row]], missing: List[int], chunk_size: int, progress: bool,
                        fast_loop: bool, save: Callable[[int, store_mod.Entry], None]) -> List[FastCheck]:
    """Optimize the requests ``missing`` in chunks of ``chunk_size`` (parameters frozen;
    requests ordered by their longest row, so a chunk's rows have similar lengths),
    calling ``save(request index, Entry)`` for each request as soon as its chunk finishes.
    One :class:`LayerLoop` serves every chunk (None when ``fast_loop`` is off or
    unsupported). Returns the chunks' step-0 checks of the loop."""
    chunk = max(1, int(chunk_size or DEFAULT_CHUNK))
    loop = None
    if fast_loop and missing:
        loop = LayerLoop.build(spec.model, spec.objective, spec.readout)
    # Chunks of requests of similar prompt length: every row of a chunk's forward pass is
    # padded to the chunk's longest row (CounterFact, chunks of 16: real / padded tokens
    # 0.63 in file order, 0.77 sorted). Float rounding only: chunking is not in the cache key.
    missing = sorted(missing, key=lambda r: max(len(row.ids) for row in rows_of[r]))
    checks: List[FastCheck] = []
    with frozen_parameters(spec.model):
        for start in range(0, len(missing), chunk):
            idx = missing[start:start + chunk]
            *result, check = optimize_chunk(spec, renumbered(rows_of, idx), len(idx), progress, loop)
            checks += [check] if check is not None else []
            for r, entry in zip(idx, store_mod.split_result(*result)):
                save(r, entry)
    return checks


def _step(problem: Problem, forward: DeltaForward, batch: Batch, delta: torch.Tensor,
          factor: torch.Tensor) -> StepLoss:
    """One step's forward with ``delta [S, R, d]`` and per-request losses (``factor [R]``: NLL weights)."""
    kl_logits, h_loss = forward(batch, problem.edits(batch, delta))
    return problem.losses(batch, kl_logits, h_loss, delta, factor)


@dataclass
class Bookkeeping:
    """Per-request state of the loop, all ``[R]`` on the CPU: ``active`` (still optimized),
    ``factor`` (the NLL weight, lowered by PMET's adaptive rule), and ``final_nll`` /
    ``steps`` (set when a request finishes: early stop or the last step)."""

    active: torch.Tensor
    factor: torch.Tensor
    final_nll: torch.Tensor
    steps: torch.Tensor
    nll_factor: float
    adaptive_kl_factor: Optional[float]  # kl_factor with PMET's adaptive rule, else None
    early_stop: float

    @classmethod
    def start(cls, n_req: int, objective: Objective) -> "Bookkeeping":
        """Every request active, NLL weight ``nll_factor``, nothing finished."""
        return cls(torch.ones(n_req, dtype=torch.bool), torch.full((n_req,), float(objective.nll_factor)),
                   torch.full((n_req,), float("nan")), torch.zeros(n_req, dtype=torch.long), objective.nll_factor,
                   objective.kl_factor if objective.adaptive_nll else None, objective.early_stop)

    def check_finite(self, loss: torch.Tensor, sites, it: int) -> None:
        """Check the per-request ``loss [R]`` at step ``it`` of the active requests.

        Raises:
            NumericalError: an active request's loss is NaN or infinite (the message names
                the requests, the anchor ``sites`` and the step).
        """
        if not torch.isfinite(loss[self.active.to(loss.device)]).all():
            bad = [i for i in range(len(self.active)) if self.active[i] and not torch.isfinite(loss[i])]
            raise NumericalError(f"anchor optimization at layer sites {sites}: non-finite loss for request(s) {bad} at step {it}")

    def observe(self, it: int, last: bool, step: StepLoss) -> bool:
        """Finish the requests that stop after step ``it`` (loss below ``early_stop``; PMET:
        also target argmax and weighted KL <= 0.01; all at the ``last`` step), recording
        their NLL and step count; update PMET's factor. Returns whether any is still active."""
        done = self.active & (step.loss.detach().cpu() < self.early_stop)
        if self.adaptive_kl_factor is not None:
            argmax, kl_small = pmet_signals(step, self.adaptive_kl_factor)
            done |= self.active & ~done & argmax & kl_small
            self.factor = torch.where(argmax, 0.1 * self.nll_factor, float(self.nll_factor))
        if last:
            done = self.active.clone()
        self.final_nll[done] = step.nll.nll_req.detach().cpu()[done]
        self.steps[done] = it + 1
        self.active = self.active & ~done
        return bool(self.active.any())


def _update(opt: torch.optim.Optimizer, delta: torch.Tensor, loss: torch.Tensor, active: torch.Tensor,
            init: List[torch.Tensor], clamp_norm_factor: float) -> None:
    """One Adam step on ``delta [S, R, d]`` for the summed ``loss [R]`` of the ``active [R]``
    requests; the finished requests' deltas are restored (frozen) and each active delta is
    clamped to ``clamp_norm_factor * |init_s|`` (``init``: ``S`` x ``[R, d]``)."""
    on_delta = active.to(delta.device)
    opt.zero_grad()
    loss[active.to(loss.device)].sum().backward()
    frozen = delta.detach()[:, ~on_delta].clone()
    opt.step()
    with torch.no_grad():
        delta[:, ~on_delta] = frozen
        for s, h in enumerate(init):
            max_norm = clamp_norm_factor * h.float().norm(dim=-1).to(delta.device)
            norms = delta[s].norm(dim=-1)
            scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
            scale = torch.where(on_delta, scale, torch.ones_like(scale))
            delta[s] *= scale[:, None]


def _step_range(n_steps: int, n_req: int, progress: bool):
    if not progress:
        return range(n_steps)
    from tqdm.auto import tqdm

    return tqdm(range(n_steps), desc=f"anchors ({n_req} requests)", leave=False)


def optimize_chunk(spec: _Spec, rows: List[Row], n_req: int, progress: bool, loop: Optional[LayerLoop]):
    """Optimize the deltas of one chunk of ``R = n_req`` requests (``rows`` numbered ``0..R-1``):
    Adam for ``v_num_grad_steps`` steps, the full forward at step 0, then ``loop`` if it agrees.

    Returns:
        ``(init [S, R, d] model dtype, delta [S, R, d] float32, nll [R], steps [R], check)``
        with ``check`` the step-0 :class:`FastCheck` of ``loop`` (None without one).

    Raises:
        NumericalError: a non-finite loss or delta.
    """
    obj = spec.objective
    problem = Problem(obj, spec.readout, rows, n_req, pad_id_of(spec.tok), input_device(spec.model))
    forward: DeltaForward = FullForward(spec.model, obj.loss_name)
    if loop is not None:
        loop.reset()  # row indices are per chunk
    delta = torch.zeros((len(obj.sites), n_req, hidden_size(spec.model)), dtype=torch.float32, device=spec.device,
                        requires_grad=True)
    opt = torch.optim.Adam([delta], lr=obj.v_lr)
    book = Bookkeeping.start(n_req, obj)
    n_steps = int(obj.v_num_grad_steps)
    check = None
    for it in _step_range(n_steps, n_req, progress):
        batch = problem.batch(book.active)
        step = _step(problem, forward, batch, delta, book.factor)
        if it == 0 and loop is not None:
            fast_loss = partial(_step, problem, loop, batch, delta, book.factor)
            check = check_fast(lambda: fast_loss().loss, step.loss, book.active, list(obj.sites))
            forward = loop if check.agrees else forward
        book.check_finite(step.loss, list(obj.sites), it)
        if not book.observe(it, it == n_steps - 1, step):
            break
        _update(opt, delta, step.loss, book.active, problem.init, obj.clamp_norm_factor)
    if not torch.isfinite(delta.detach()).all():
        raise NumericalError(f"anchor optimization produced a non-finite delta at sites {list(obj.sites)}")
    return torch.stack(problem.init, 0), delta.detach(), book.final_nll, book.steps, check
