"""Anchor optimization at any layer, batched over requests.

The objective is EasyEdit's ``compute_z`` (MEMIT/EMMET/AlphaEdit) and, with two
sites, ``compute_zs`` (PMET): a delta is added to a module's output at the lookup
token of every rewriting prompt (context template + prompt + target tokens but
the last) and of the KL prompt ``"{subject} is a"``; the loss is

    nll_factor * mean_templates NLL(target_new | prompt)          (read at v_loss_layer
                                                                   through ln_f / lm_head)
    + kl_factor * KL(current || initial) on the KL prompt's next token
    + v_weight_decay * sum_sites |delta| / |h|^2

Adam with ``v_lr`` for ``v_num_grad_steps`` steps; after each step each delta is
clamped to ``clamp_norm_factor * |h|``; a request stops when its loss drops below
0.05 (PMET: also when the target is the argmax and the KL is <= 0.01).

Batching: the anchors of all requests of a chunk are optimized in one loop with
one forward/backward over all their prompts per step. Each request has its own
delta, its own loss term (the total is the SUM, so every delta sees exactly its
own gradient), its own clamp and its own early stop; Adam is elementwise, so the
result equals optimizing each request alone up to float rounding of the batched
forward pass. Requests that stopped are dropped from later forward passes and
their deltas are frozen.

Structure: :func:`optimize_anchors` (cache lookup, chunks, stacking) ->
:func:`_optimize_chunk`, a loop over :class:`_Problem` (rows, lookup positions,
targets, KL prompts, the states recorded on the first pass, the loss), :func:`_step`
(one forward with deltas -> per-request losses), :class:`_Bookkeeping` (active
requests, PMET's adaptive factor, final NLL and steps) and :func:`_update` (Adam,
freeze, clamp). The forward with deltas is a :class:`DeltaForward`:
:class:`FullForward` or :class:`LayerLoop`.

Speed: each step runs only the decoder layers from the anchor layer on
(:class:`LayerLoop`; the earlier states do not depend on the delta), checked
against the full forward pass at step 0 of every chunk. Anchors are kept in a
per-request disk cache (:mod:`easyedit_replay.anchor_cache`), so a rerun on the
same edits and weights optimizes nothing.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import anchor_cache as cache_mod
from .errors import NumericalError, RequestError
from .batching import input_device, pad_id_of, pad_right, token_ids
from .prompts import EditRequest, escape_braces, flat_templates, lookup_index
from .model_info import hidden_size, max_positions
from .tracing import StopForward, Trace, add_at_positions, hidden_of, resolve_module, run

log = logging.getLogger(__name__)

EARLY_STOP_LOSS = 5e-2


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
    """

    layer: int
    sites: List[str]
    init: torch.Tensor
    delta: torch.Tensor
    nll: torch.Tensor
    steps: torch.Tensor

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


def target_token_ids(tok, target: str) -> List[int]:
    """Token ids of ``target_new`` as ``compute_z`` builds them (no special tokens, a
    leading BOS/UNK dropped)."""
    ids = list(tok.encode(target, add_special_tokens=False))
    if ids and ids[0] in (tok.bos_token_id, tok.unk_token_id):
        ids = ids[1:]
    return ids


@dataclass
class _Row:
    request: int
    ids: List[int]
    lookup: int
    kl: bool
    first: bool  # the first context template of its request (records h)
    target: List[int]


def _build_rows(tok, requests: Sequence[EditRequest], templates, fact_token: str, max_pos: Optional[int]) -> List[_Row]:
    rows: List[_Row] = []
    for r, req in enumerate(requests):
        target = target_token_ids(tok, req.target_new)
        if not target:
            raise RequestError(f"requests[{r}].target_new = {req.target_new!r} tokenizes to no tokens; give a non-empty target")
        suffix = escape_braces(tok.decode(target[:-1]))
        for t, ctx in enumerate(flat_templates(templates)):
            prompt_t = ctx.format(req.prompt)
            full_t = prompt_t + suffix
            ids = token_ids(tok, full_t.format(req.subject))
            look = lookup_index(tok, full_t, req.subject, fact_token, prompt_end=prompt_t)
            if len(ids) < len(target) or not 0 <= look < len(ids):
                raise RequestError(f"requests[{r}]: prompt {req.text!r} is too short for target {req.target_new!r}")
            rows.append(_Row(r, ids, look, False, t == 0, target))
        kl_t = "{} is a"
        ids = token_ids(tok, kl_t.format(req.subject))
        rows.append(_Row(r, ids, lookup_index(tok, kl_t, req.subject, fact_token), True, False, target))
        longest = max(len(row.ids) for row in rows if row.request == r)
        if max_pos is not None and longest > max_pos:
            raise RequestError(
                f"requests[{r}]: a rewriting prompt has {longest} tokens, more than the model's "
                f"context of {max_pos}; shorten the prompt or the context templates"
            )
    return rows


class _Readout:
    """``ln_f_module`` and ``lm_head_module``: :meth:`logits` ``[..., d] -> [..., V]`` float32,
    as ``compute_z`` reads the output distribution from a hidden state."""

    def __init__(self, ln_f, head):
        self.ln_f, self.weight, self.bias = ln_f, head.weight, getattr(head, "bias", None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Computed where the modules live: ``h`` moves to ``ln_f``'s device and the normed
        state to the unembedding's, never the other way (the unembedding of a 128k-vocabulary
        model is the largest matrix); float32 logits for half-precision models too
        (:mod:`easyedit_replay.precision`)."""
        norm_param = next(self.ln_f.parameters(), None)
        if norm_param is not None and norm_param.device.type != "meta":
            h = h.to(norm_param.device)
        out = self.ln_f(h).to(self.weight.device).float() @ self.weight.float().T
        return out if self.bias is None else out + self.bias.float()


@dataclass
class _Spec:
    """What is fixed for the anchors of one layer: the model, the ``S`` sites (formatted module
    names), the loss layer (``max(v_loss_layer, layer)``) and its module name, the readout,
    the objective's PMET options, and the dtype/device of the first site's parameters (the
    deltas and ``init`` live there)."""

    model: nn.Module
    tok: object
    hparams: object
    layer: int
    sites: List[str]
    loss_layer: int
    loss_name: str
    readout: _Readout
    nll_factor: float
    adaptive_nll: bool
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def resolve(cls, model, tok, hparams, layer: int, site_templates: Sequence[str], nll_factor: float,
                adaptive_nll: bool) -> "_Spec":
        """Raises HyperParamsError for a module template that names no module."""
        sites = [t.format(layer) for t in site_templates]
        loss_layer = max(int(hparams.v_loss_layer), int(layer))
        loss_name = hparams.layer_module_tmp.format(loss_layer)
        for name in sites + [loss_name]:
            resolve_module(model, name, "layer_module_tmp")
        readout = _Readout(resolve_module(model, hparams.ln_f_module, "ln_f_module"),
                           resolve_module(model, hparams.lm_head_module, "lm_head_module"))
        param = next(resolve_module(model, sites[0]).parameters(), None)
        dtype = param.dtype if param is not None else next(model.parameters()).dtype
        device = param.device if param is not None else input_device(model)
        return cls(model, tok, hparams, layer, sites, loss_layer, loss_name, readout, nll_factor, adaptive_nll,
                   dtype, device)


def optimize_anchors(
    model,
    tok,
    requests: Sequence[EditRequest],
    hparams,
    layer: int,
    site_templates: Sequence[str],
    templates: List[List[str]],
    nll_factor: float = 1.0,
    adaptive_nll: bool = False,
    progress: bool = False,
    anchor_cache: Optional[bool] = None,
    fast_loop: bool = True,
) -> AnchorResult:
    """Optimize one anchor per request at ``layer`` (any layer), batched, cached on disk.

    Args:
        requests: ``R`` prepared requests.
        hparams: uses ``v_num_grad_steps, v_lr, v_loss_layer, v_weight_decay,
            clamp_norm_factor, kl_factor, fact_token, layer_module_tmp, ln_f_module,
            lm_head_module, anchor_batch_size, anchor_cache``.
        layer: the anchor layer (the last edit layer for spreading, the first for replay).
        site_templates: module templates where deltas are added, e.g.
            ``[layer_module_tmp]`` (MEMIT) or ``[attn_module_tmp, mlp_module_tmp]`` (PMET).
        templates: context templates (``[["{}"], [...]]``).
        nll_factor: weight of the NLL term (PMET's ``nll_loss_factor``).
        adaptive_nll: PMET's rule: once the target is the argmax everywhere, the NLL
            weight drops to ``0.1 * nll_factor`` and a weighted KL term
            (``kl_factor * KL``) <= 0.01 stops the request (``pmet/compute_zs.py``).
        anchor_cache: read and write the per-request disk cache
            (:mod:`easyedit_replay.anchor_cache`); None: ``hparams.anchor_cache``
            (default True). Only requests not found are optimized, in chunks of
            ``anchor_batch_size``; each chunk is written as soon as it finishes.
        fast_loop: run only the decoder layers from the anchor layer on in the
            optimization loop (the earlier states do not depend on the delta);
            checked against the full forward pass at step 0 of each chunk, with a
            fallback to the full pass (see :class:`LayerLoop`). False: always the
            full forward pass.

    Returns:
        :class:`AnchorResult` with ``init``/``delta`` of shape ``[S, R, d]``. With the
        cache, a request found on disk gets its stored anchor bit for bit; neither
        ``anchor_batch_size`` nor ``fast_loop`` is part of the key, since they only
        change float rounding.

    Raises:
        RequestError: a target that tokenizes to nothing, or prompts longer than the
            model's context.
        NumericalError: a non-finite loss or delta.
        HyperParamsError: a module template that names no module.

    Source: EasyEdit ``memit/compute_z.py::compute_z`` and ``pmet/compute_zs.py``.
    """
    spec = _Spec.resolve(model, tok, hparams, layer, site_templates, nll_factor, adaptive_nll)
    rows_of = _rows_by_request(tok, requests, templates, hparams.fact_token, max_positions(model))
    use_cache = bool(getattr(hparams, "anchor_cache", True)) if anchor_cache is None else bool(anchor_cache)
    store, keys, found = _cache_lookup(spec, requests, rows_of, templates) if use_cache else (None, None, {})
    missing = [r for r in range(len(requests)) if r not in found]
    entries: Dict[int, cache_mod.Entry] = dict(found)

    def save(r: int, entry: cache_mod.Entry) -> None:
        entries[r] = entry
        if store is not None:
            store.put(keys[r], entry)

    _optimize_in_chunks(spec, rows_of, missing, progress, fast_loop, save)
    if use_cache:
        log.info("anchors at layer %d: %d loaded from the cache, %d optimized (%s)",
                 layer, len(found), len(missing), store.root)
    init, delta, nll, steps = cache_mod.stack_entries([entries[r] for r in range(len(requests))], spec.device)
    return AnchorResult(layer, spec.sites, init, delta, nll, steps)


def _rows_by_request(tok, requests, templates, fact_token: str, max_pos: Optional[int]) -> List[List[_Row]]:
    """``R`` lists of rows: each request's rewriting prompts (one per context template) and its KL prompt."""
    rows = _build_rows(tok, requests, templates, fact_token, max_pos)
    return [[row for row in rows if row.request == r] for r in range(len(requests))]


def _cache_lookup(spec: _Spec, requests, rows_of: List[List[_Row]], templates):
    """``(store, keys, found)``: the disk cache, one :class:`~easyedit_replay.anchor_cache.CacheKey`
    per request, and ``{request index: Entry}`` for the requests stored already."""
    store = cache_mod.AnchorStore()
    keys = cache_mod.request_keys(
        spec.model, requests, [[(row.ids, row.lookup, row.kl) for row in rows] for rows in rows_of], spec.hparams,
        spec.layer, spec.sites, spec.loss_name, templates, spec.nll_factor, spec.adaptive_nll, EARLY_STOP_LOSS)
    return store, keys, store.lookup(keys, len(spec.sites), hidden_size(spec.model), spec.dtype)


def _optimize_in_chunks(spec: _Spec, rows_of: List[List[_Row]], missing: List[int], progress: bool,
                        fast_loop: bool, save: Callable[[int, "cache_mod.Entry"], None]) -> None:
    """Optimize the requests ``missing`` in chunks of ``anchor_batch_size`` (parameters frozen;
    requests ordered by their longest row, so a chunk's rows have similar lengths),
    calling ``save(request index, Entry)`` for each request as soon as its chunk finishes. One
    :class:`LayerLoop` serves every chunk (None when ``fast_loop`` is off or unsupported)."""
    chunk = max(1, int(getattr(spec.hparams, "anchor_batch_size", 16) or 16))
    loop = None
    if fast_loop and missing:
        loop = LayerLoop.build(spec.model, spec.hparams, spec.layer, spec.sites, spec.loss_layer, spec.readout)
    # Chunks of requests of similar prompt length: every row of a chunk's forward pass is
    # padded to the chunk's longest row (CounterFact, chunks of 16: real / padded tokens
    # 0.63 in file order, 0.77 sorted). Float rounding only: chunking is not in the cache key.
    missing = sorted(missing, key=lambda r: max(len(row.ids) for row in rows_of[r]))
    with frozen_parameters(spec.model):
        for start in range(0, len(missing), chunk):
            idx = missing[start:start + chunk]
            rows = [replace(row, request=j) for j, r in enumerate(idx) for row in rows_of[r]]
            for r, entry in zip(idx, cache_mod.split_result(*_optimize_chunk(spec, rows, len(idx), progress, loop))):
                save(r, entry)


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


_WARNED = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("anchor loop: %s; using the full forward pass", reason)


@dataclass
class _Batch:
    """The rows of one step's still-active requests, ``B`` of them, padded right.

    Attributes:
        rows: the ``B`` rows; ``live``: their indices in the chunk's rows (the
            :class:`LayerLoop` capture key).
        ids, mask: ``[B, T]`` token ids and attention mask on the input device.
        row_req, looks: ``[B]`` long (CPU): each row's request and lookup position.
    """

    rows: List[_Row]
    live: Tuple[int, ...]
    ids: torch.Tensor
    mask: torch.Tensor
    row_req: torch.Tensor
    looks: torch.Tensor

    @classmethod
    def of(cls, rows: List[_Row], active: torch.Tensor, pad: int, device) -> "_Batch":
        """The rows of the requests with ``active[request]`` (``active [R]`` bool)."""
        live = tuple(i for i, row in enumerate(rows) if active[row.request])
        batch = [rows[i] for i in live]
        ids, mask = pad_right([row.ids for row in batch], pad, device)
        return cls(batch, live, ids, mask, torch.tensor([row.request for row in batch]),
                   torch.tensor([row.lookup for row in batch]))

    @property
    def first(self) -> List[int]:
        """Rows of each request's first context template (they record ``init``)."""
        return [i for i, row in enumerate(self.rows) if row.first]

    @property
    def kl_idx(self) -> List[int]:
        """Rows of the KL prompts (``K`` of them, one per active request)."""
        return [i for i, row in enumerate(self.rows) if row.kl]

    def requests_of(self, idx: List[int]) -> List[int]:
        return [self.rows[i].request for i in idx]

    def lookups_of(self, idx: List[int]) -> List[int]:
        return [self.rows[i].lookup for i in idx]


class DeltaForward:
    """The anchor loop's "forward with deltas": ``forward(batch, edits) -> (kl_logits [K, V],
    h_loss [B, T, d])`` for a :class:`_Batch` of ``B`` rows, with ``edits`` (``{site: fn}``, as
    in :class:`Trace`) adding the deltas: the logits of the next token at the ``K`` KL
    prompts' lookup tokens and the loss layer's output. Two implementations:
    :class:`FullForward` (the whole model) and :class:`LayerLoop` (from the anchor layer on)."""

    def __call__(self, batch: _Batch, edits) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class FullForward(DeltaForward):
    """:class:`DeltaForward` through the whole model (its own logits; ``logits_to_keep`` limits
    them to the KL lookup positions when the model accepts it)."""

    def __init__(self, model, loss_name: str):
        self.model, self.loss_name = model, loss_name
        self.keep_arg = _accepts_logits_to_keep(model)

    def __call__(self, batch: _Batch, edits) -> Tuple[torch.Tensor, torch.Tensor]:
        kl_idx = batch.kl_idx
        kl_looks = batch.lookups_of(kl_idx)
        kl_positions = sorted(set(kl_looks))
        extra = {}
        if self.keep_arg:
            extra["logits_to_keep"] = torch.tensor(kl_positions, device=batch.ids.device)
        trace = Trace(self.model, outputs=[self.loss_name], edits=edits, detach=False)
        logits = run(self.model, trace, input_ids=batch.ids, attention_mask=batch.mask, **extra).logits
        if self.keep_arg:
            pos_col = {p: j for j, p in enumerate(kl_positions)}
            kl_logits = logits[kl_idx, [pos_col[p] for p in kl_looks]]
        else:
            kl_logits = logits[kl_idx, kl_looks]
        return kl_logits, trace.outputs[self.loss_name]


class LayerLoop(DeltaForward):
    """The anchor loop's forward pass from the anchor layer on.

    States before the anchor layer do not depend on the delta. For a batch, one
    no-grad pass of the model up to the first layer that must run records that
    layer's input and the arguments (attention mask, position embeddings, ...)
    every later decoder layer is called with (each later layer's ``forward`` is
    briefly replaced by a recorder, so those layers do not run); each step then
    calls only the decoder layers ``start..n-1`` with those arguments. ``start``
    is the layer after the anchor layer when the only site is the anchor layer's
    own output (MEMIT, EMMET, AlphaEdit: the delta is added to the captured
    state), else the anchor layer (PMET: deltas on its attention and MLP outputs,
    added by hooks as in the full pass). The NLL reads the loss layer's output;
    the KL logits are ``ln_f`` + unembedding of the last layer's output at the KL
    prompts' lookup tokens only.

    Works for Hugging Face decoders whose ``layer_module_tmp`` (e.g.
    ``model.layers.{}``) names the items of a ``ModuleList``; :meth:`build`
    returns None (and warns once) otherwise. The optimization loop compares the
    loss of this pass with the full forward pass at step 0 of every chunk and
    falls back to the full pass (with a warning) if they differ.
    """

    def __init__(self, model, layers, start: int, loss_layer: int, block_site: Optional[str], loss_name: str,
                 readout: _Readout):
        self.model = model
        self.layers = layers
        self.start = start
        self.loss_layer = loss_layer
        self.block_site = block_site  # the site when it is the output of layer start - 1
        self.loss_name = loss_name
        self.readout = readout
        self.captured = None
        self.captured_for = None

    @classmethod
    def build(cls, model, hparams, layer: int, sites: Sequence[str], loss_layer: int,
              readout: _Readout) -> Optional["LayerLoop"]:
        """A loop for this model and these sites, or None when unsupported (warned once)."""
        tmp = hparams.layer_module_tmp
        if not tmp.endswith("{}"):
            _warn_once(f"layer_module_tmp {tmp!r} does not end with the layer index")
            return None
        modules = dict(model.named_modules())
        layers = modules.get(tmp[:-2].rstrip("."))
        if not isinstance(layers, nn.ModuleList) or not 0 <= layer < len(layers) or \
                modules.get(tmp.format(layer)) is not layers[layer]:
            _warn_once(f"{tmp[:-2].rstrip('.')!r} is not a ModuleList of decoder layers on {type(model).__name__}")
            return None
        block = tmp.format(layer)
        if all(s == block for s in sites):
            start, block_site = layer + 1, block
        elif all(s.startswith(block + ".") for s in sites):
            start, block_site = layer, None
        else:
            _warn_once(f"anchor sites {list(sites)} are not inside decoder layer {block!r}")
            return None
        if start >= len(layers) or loss_layer >= len(layers):
            _warn_once(f"the anchor layer {layer} or loss layer {loss_layer} is the model's last layer or beyond")
            return None
        return cls(model, layers, start, loss_layer, block_site, tmp.format(loss_layer), readout)

    def reset(self) -> None:
        """Forget the captured batch (row indices are per chunk)."""
        self.captured = self.captured_for = None

    def capture(self, ids: torch.Tensor, mask: torch.Tensor, key) -> None:
        """Record the input of layer ``start`` and the call arguments of layers ``start..n-1``
        for the batch ``ids``/``mask`` ``[B, T]`` (no-grad; skipped if ``key`` was captured last)."""
        if self.captured_for == key:
            return
        calls: List[tuple] = []
        saved = []
        last = len(self.layers) - 1

        def recorder(j):
            def record(*args, **kwargs):
                calls.append((args, kwargs))
                if j == last:
                    raise StopForward()
                return args[0] if args else kwargs.get("hidden_states")

            return record

        try:
            for j in range(self.start, last + 1):
                layer = self.layers[j]
                saved.append((layer, layer.__dict__.get("forward")))
                layer.forward = recorder(j)
            with torch.no_grad():
                try:
                    self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                except StopForward:
                    pass
        finally:
            for layer, previous in saved:
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous
        if len(calls) != len(self.layers) - self.start:
            raise RuntimeError(f"captured {len(calls)} decoder layer calls, expected {len(self.layers) - self.start}")
        self.captured, self.captured_for = calls, key

    @staticmethod
    def _with_hidden(call, h):
        args, kwargs = call
        if args and isinstance(args[0], torch.Tensor):
            return (h,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    @staticmethod
    def _hidden_in(call) -> torch.Tensor:
        args, kwargs = call
        return args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]

    def forward(self, loss_name: str, edits) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(h_loss, h_last)`` ``[B, T, d]``: the loss layer's and the last layer's outputs
        for the captured batch, with ``edits`` (``{site: fn}``, as in :class:`Trace`) applied."""
        h = self._hidden_in(self.captured[0])
        hooked = dict(edits)
        if self.block_site is not None:
            h = hooked.pop(self.block_site)(h)
        h_loss = h if self.loss_layer < self.start else None
        trace = Trace(self.model, outputs=[loss_name] if h_loss is None else [], edits=hooked, detach=False)
        with trace:
            for j, call in enumerate(self.captured):
                args, kwargs = self._with_hidden(call, h)
                h = hidden_of(self.layers[self.start + j](*args, **kwargs))
        return (trace.outputs[loss_name] if h_loss is None else h_loss), h

    def __call__(self, batch: _Batch, edits) -> Tuple[torch.Tensor, torch.Tensor]:
        """:class:`DeltaForward`: :meth:`capture` (once per batch), :meth:`forward`, and the KL
        logits through ``ln_f`` and the unembedding at the KL prompts' lookup tokens only."""
        self.capture(batch.ids, batch.mask, batch.live)
        h_loss, h_last = self.forward(self.loss_name, edits)
        kl_idx = batch.kl_idx
        sel = h_last[torch.tensor(kl_idx, device=h_last.device),
                     torch.tensor(batch.lookups_of(kl_idx), device=h_last.device)]
        return self.readout.logits(sel), h_loss


@dataclass
class _StepLoss:
    """One step's losses: ``loss [R]`` (with gradient; 0 for finished requests), the target
    NLL terms, and ``kl [R]`` the unweighted KL per request."""

    loss: torch.Tensor
    nll: "_NLL"
    kl: torch.Tensor


class _Problem:
    """The anchor problem of one chunk of ``R`` requests: its rows (per request, one per context
    template and one KL prompt, with lookup positions and target tokens) and the states the
    first forward pass records: ``init`` (``S`` x ``[R, d]``, model dtype: each site's output
    at the lookup token of the request's first context template) and ``kl_init`` (``[R, V]``
    float32: the KL prompt's next-token log-probabilities before editing)."""

    def __init__(self, spec: _Spec, rows: List[_Row], n_req: int):
        self.spec, self.rows, self.n_req = spec, rows, n_req
        self.pad, self.device = pad_id_of(spec.tok), input_device(spec.model)
        self.init: List[Optional[torch.Tensor]] = [None] * len(spec.sites)
        self.kl_init: Optional[torch.Tensor] = None

    def batch(self, active: torch.Tensor) -> _Batch:
        """The rows of the requests with ``active [R]``."""
        return _Batch.of(self.rows, active, self.pad, self.device)

    def edits(self, batch: _Batch, delta: torch.Tensor) -> Dict[str, Callable]:
        """``{site: fn}`` adding ``delta [S, R, d]`` at each row's lookup token."""
        return {site: partial(self._edit, s, batch, delta) for s, site in enumerate(self.spec.sites)}

    def _edit(self, s: int, batch: _Batch, delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.init[s] is None:
            first = batch.first
            rec = torch.empty((self.n_req, h.shape[-1]), dtype=h.dtype, device=h.device)
            rec[batch.requests_of(first)] = h[first, batch.looks[first].to(h.device)].detach()
            self.init[s] = rec
        rows = torch.arange(len(batch.rows))
        return add_at_positions(h, rows, batch.looks, delta[s][batch.row_req.to(delta.device)])

    def losses(self, batch: _Batch, kl_logits, h_loss, delta: torch.Tensor, factor: torch.Tensor) -> _StepLoss:
        """``compute_z``'s loss per request from a :class:`DeltaForward`'s ``kl_logits [K, V]``
        and ``h_loss [B, T, d]``: ``factor [R] * NLL + kl_factor * KL + v_weight_decay * sum_s
        |delta_s| / |init_s|^2``."""
        hp = self.spec.hparams
        kl_req = batch.requests_of(batch.kl_idx)
        kl_logp = torch.log_softmax(kl_logits.float(), dim=-1)
        if self.kl_init is None:
            self.kl_init = torch.empty((self.n_req, kl_logp.shape[-1]), dtype=kl_logp.dtype, device=kl_logp.device)
            self.kl_init[kl_req] = kl_logp.detach()
        nll = _target_nll(batch.rows, h_loss, self.spec.readout, self.n_req)
        dev = nll.logp.device
        kl_val = (kl_logp.exp() * (kl_logp - self.kl_init[kl_req])).sum(-1)
        kl = torch.zeros(self.n_req, device=dev).index_add(0, torch.tensor(kl_req, device=dev), kl_val)
        wd = torch.zeros(self.n_req, device=dev)
        for s, init in enumerate(self.init):
            wd = wd + (delta[s].norm(dim=-1) / init.float().norm(dim=-1).to(delta.device) ** 2).to(dev)
        wd = hp.v_weight_decay * wd
        return _StepLoss(factor.to(dev) * nll.nll_req + hp.kl_factor * kl + wd, nll, kl)


def _step(problem: _Problem, forward: DeltaForward, batch: _Batch, delta: torch.Tensor,
          factor: torch.Tensor) -> _StepLoss:
    """One step's forward with ``delta [S, R, d]`` and per-request losses (``factor [R]``: NLL weights)."""
    kl_logits, h_loss = forward(batch, problem.edits(batch, delta))
    return problem.losses(batch, kl_logits, h_loss, delta, factor)


@dataclass
class _Bookkeeping:
    """Per-request state of the loop, all ``[R]`` on the CPU: ``active`` (still optimized),
    ``factor`` (the NLL weight, lowered by PMET's adaptive rule), and ``final_nll`` /
    ``steps`` (set when a request finishes: early stop or the last step)."""

    active: torch.Tensor
    factor: torch.Tensor
    final_nll: torch.Tensor
    steps: torch.Tensor
    nll_factor: float
    adaptive_kl_factor: Optional[float]  # kl_factor with PMET's adaptive rule, else None

    @classmethod
    def start(cls, n_req: int, nll_factor: float, adaptive_kl_factor: Optional[float]) -> "_Bookkeeping":
        return cls(torch.ones(n_req, dtype=torch.bool), torch.full((n_req,), float(nll_factor)),
                   torch.full((n_req,), float("nan")), torch.zeros(n_req, dtype=torch.long), nll_factor,
                   adaptive_kl_factor)

    def check_finite(self, loss: torch.Tensor, sites, it: int) -> None:
        """Raises NumericalError naming the active requests whose ``loss [R]`` is not finite."""
        if not torch.isfinite(loss[self.active.to(loss.device)]).all():
            bad = [i for i in range(len(self.active)) if self.active[i] and not torch.isfinite(loss[i])]
            raise NumericalError(f"anchor optimization at layer sites {sites}: non-finite loss for request(s) {bad} at step {it}")

    def observe(self, it: int, last: bool, step: _StepLoss) -> bool:
        """Finish the requests that stop after step ``it`` (loss below EARLY_STOP_LOSS; PMET:
        also target argmax and weighted KL <= 0.01; all at the ``last`` step), recording
        their NLL and step count; update PMET's factor. Returns whether any is still active."""
        done = self.active & (step.loss.detach().cpu() < EARLY_STOP_LOSS)
        if self.adaptive_kl_factor is not None:
            argmax, kl_small = _pmet_signals(step, self.adaptive_kl_factor)
            done |= self.active & ~done & argmax & kl_small
            self.factor = torch.where(argmax, 0.1 * self.nll_factor, float(self.nll_factor))
        if last:
            done = self.active.clone()
        self.final_nll[done] = step.nll.nll_req.detach().cpu()[done]
        self.steps[done] = it + 1
        self.active = self.active & ~done
        return bool(self.active.any())


def _pmet_signals(step: _StepLoss, kl_factor: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """PMET's adaptive rule (``pmet/compute_zs.py``), ``[R]`` bool on the CPU each: ``argmax``
    (mean over rewriting prompts of the target's probability equals that of the argmax token,
    per-token means of log-probabilities) and ``kl_small`` (``kl_factor * KL <= 0.01``)."""
    nll = step.nll
    n_req, dev = len(nll.counts), nll.logp.device
    max_logp = nll.logp.detach().max(-1).values
    max_row = torch.zeros(len(nll.nll_row), device=dev).index_add(0, nll.owner, max_logp) / nll.lengths
    maxprob = torch.zeros(n_req, device=dev).index_add(0, nll.rew_req, max_row.exp())
    prob = torch.zeros(n_req, device=dev).index_add(0, nll.rew_req, (-nll.nll_row.detach()).exp())
    maxprob, prob = (maxprob / nll.counts.clamp(min=1)).cpu(), (prob / nll.counts.clamp(min=1)).cpu()
    kl_small = (kl_factor * step.kl.detach()).cpu() <= 0.01  # compute_zs: kl_loss (weighted) <= 0.01
    return maxprob == prob, kl_small


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


def _optimize_chunk(spec: _Spec, rows: List[_Row], n_req: int, progress: bool, loop: Optional[LayerLoop]):
    """Optimize the deltas of one chunk of ``R = n_req`` requests (``rows`` numbered ``0..R-1``):
    Adam for ``v_num_grad_steps`` steps, the full forward at step 0, then ``loop`` if it agrees.

    Returns:
        ``(init [S, R, d] model dtype, delta [S, R, d] float32, nll [R], steps [R])``.
    """
    hp = spec.hparams
    problem = _Problem(spec, rows, n_req)
    forward: DeltaForward = FullForward(spec.model, spec.loss_name)
    if loop is not None:
        loop.reset()  # row indices are per chunk
    delta = torch.zeros((len(spec.sites), n_req, hidden_size(spec.model)), dtype=torch.float32, device=spec.device,
                        requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    book = _Bookkeeping.start(n_req, spec.nll_factor, hp.kl_factor if spec.adaptive_nll else None)
    n_steps = int(hp.v_num_grad_steps)
    for it in _step_range(n_steps, n_req, progress):
        batch = problem.batch(book.active)
        step = _step(problem, forward, batch, delta, book.factor)
        if it == 0 and loop is not None and _check_fast(partial(_step, problem, loop, batch, delta, book.factor),
                                                         step.loss, book.active, spec.sites):
            forward = loop
        book.check_finite(step.loss, spec.sites, it)
        if not book.observe(it, it == n_steps - 1, step):
            break
        _update(opt, delta, step.loss, book.active, problem.init, hp.clamp_norm_factor)
    if not torch.isfinite(delta.detach()).all():
        raise NumericalError(f"anchor optimization produced a non-finite delta at sites {spec.sites}")
    return torch.stack(problem.init, 0), delta.detach(), book.final_nll, book.steps


# Step-0 agreement of the loop from the anchor layer with the full forward pass:
# |loss_fast - loss_full| <= FAST_ATOL + FAST_RTOL * |loss_full| per request.
FAST_RTOL, FAST_ATOL = 1e-4, 1e-5
LAST_FAST_CHECK: Dict[str, float] = {}  # max abs loss difference of the latest check (tests, benchmark)


def _check_fast(fast_step: Callable[[], _StepLoss], loss_full: torch.Tensor, active: torch.Tensor, sites) -> bool:
    """Run ``fast_step`` (the step through :class:`LayerLoop`) without gradients and compare its
    per-request loss with the full pass's ``loss_full [R]`` on the ``active [R]`` requests;
    whether to use the loop for the rest of the chunk (False: warned, the full pass)."""
    try:
        with torch.no_grad():
            loss_fast = fast_step().loss
    except Exception as exc:  # an unsupported layer signature, a recorder mismatch, ...
        log.warning("anchor loop from the anchor layer failed at step 0 (%s: %s); using the full forward pass",
                    type(exc).__name__, exc)
        return False
    full = loss_full.detach()[active.to(loss_full.device)]
    fast = loss_fast[active.to(loss_fast.device)].to(full.device)
    gap = (fast - full).abs()
    LAST_FAST_CHECK.update(max_abs=float(gap.max()), max_loss=float(full.abs().max()))
    if not torch.isfinite(fast).all() or bool((gap > FAST_ATOL + FAST_RTOL * full.abs()).any()):
        log.warning("anchor loop from the anchor layer disagrees with the full forward pass at sites %s "
                    "(max loss difference %.3e); using the full forward pass for this chunk", sites, float(gap.max()))
        return False
    return True


@dataclass
class _NLL:
    logp: torch.Tensor      # [P, V] log-probabilities at every target position
    owner: torch.Tensor     # [P] index of the rewriting row of each position
    lengths: torch.Tensor   # [n_rows] target length per rewriting row
    nll_row: torch.Tensor   # [n_rows] per-token NLL per rewriting row
    rew_req: torch.Tensor   # [n_rows] request of each rewriting row
    counts: torch.Tensor    # [n_req] rewriting rows per request
    nll_req: torch.Tensor   # [n_req] mean NLL over each request's rewriting rows


def _target_nll(batch: List[_Row], h_loss: torch.Tensor, readout: _Readout, n_req: int) -> _NLL:
    """NLL of the target tokens, read from ``h_loss`` (the loss layer's output,
    ``[B, T, d]``) through ``ln_f`` and the unembedding, as ``compute_z`` does."""
    rew = [i for i, row in enumerate(batch) if not row.kl]
    lab_rows, lab_pos, lab_tok, lab_owner = [], [], [], []
    for j, i in enumerate(rew):
        row = batch[i]
        n = len(row.target)
        start = len(row.ids) - n
        lab_rows += [i] * n
        lab_pos += list(range(start, start + n))
        lab_tok += row.target
        lab_owner += [j] * n
    dev = h_loss.device
    sel = h_loss[torch.tensor(lab_rows, device=dev), torch.tensor(lab_pos, device=dev)]
    logp = torch.log_softmax(readout.logits(sel).float(), dim=-1)
    tok_t = torch.tensor(lab_tok, device=logp.device)
    owner = torch.tensor(lab_owner, device=logp.device)
    tok_logp = logp.gather(1, tok_t[:, None])[:, 0]
    lengths = torch.tensor([len(batch[i].target) for i in rew], device=logp.device, dtype=logp.dtype)
    nll_row = -torch.zeros(len(rew), device=logp.device, dtype=logp.dtype).index_add(0, owner, tok_logp) / lengths
    rew_req = torch.tensor([batch[i].request for i in rew], device=logp.device)
    counts = torch.zeros(n_req, device=logp.device).index_add(0, rew_req, torch.ones_like(nll_row))
    nll_req = torch.zeros(n_req, device=logp.device).index_add(0, rew_req, nll_row) / counts.clamp(min=1)
    return _NLL(logp, owner, lengths, nll_row, rew_req, counts, nll_req)


def target_nll(model, tok, requests: Sequence[EditRequest], hparams, templates: List[List[str]]) -> torch.Tensor:
    """``[R]`` the anchor objective's NLL term for the model as it is (no delta):
    per-token NLL of ``target_new`` over the rewriting prompts (context templates),
    read at ``v_loss_layer`` through ``ln_f_module``/``lm_head_module``.

    Compare with :attr:`AnchorResult.nll` to see how much of the optimized effect a
    weight update realizes.
    """
    rows = _build_rows(tok, requests, templates, hparams.fact_token, max_positions(model))
    rows = [row for row in rows if not row.kl]
    loss_name = hparams.layer_module_tmp.format(int(hparams.v_loss_layer))
    readout = _Readout(resolve_module(model, hparams.ln_f_module, "ln_f_module"),
                       resolve_module(model, hparams.lm_head_module, "lm_head_module"))
    ids, mask = pad_right([row.ids for row in rows], pad_id_of(tok), input_device(model))
    with torch.no_grad():
        trace = Trace(model, outputs=[loss_name], stop_when_done=True)
        run(model, trace, input_ids=ids, attention_mask=mask)
        nll = _target_nll(rows, trace.outputs[loss_name], readout, len(requests))
    return nll.nll_req.cpu()

