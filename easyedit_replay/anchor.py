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
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import NumericalError, RequestError
from .batching import input_device, pad_id_of, pad_right, token_ids
from .keys import EditRequest, escape_braces, flat_templates, lookup_index
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
    from dataclasses import replace

    from . import anchor_cache as cache_mod

    sites = [t.format(layer) for t in site_templates]
    loss_layer = max(int(hparams.v_loss_layer), int(layer))
    loss_name = hparams.layer_module_tmp.format(loss_layer)
    for name in sites + [loss_name]:
        resolve_module(model, name, "layer_module_tmp")
    ln_f = resolve_module(model, hparams.ln_f_module, "ln_f_module")
    head = resolve_module(model, hparams.lm_head_module, "lm_head_module")
    all_rows = _build_rows(tok, requests, templates, hparams.fact_token, max_positions(model))
    rows_of = [[row for row in all_rows if row.request == r] for r in range(len(requests))]
    chunk = max(1, int(getattr(hparams, "anchor_batch_size", 16) or 16))
    use_cache = bool(getattr(hparams, "anchor_cache", True)) if anchor_cache is None else bool(anchor_cache)
    S, hidden = len(sites), hidden_size(model)
    site_param = next(resolve_module(model, sites[0]).parameters(), None)
    dtype = site_param.dtype if site_param is not None else next(model.parameters()).dtype

    found: Dict[int, "cache_mod.Entry"] = {}
    store = keys = None
    if use_cache:
        store = cache_mod.AnchorStore()
        keys = cache_mod.request_keys(
            model, requests, [[(row.ids, row.lookup, row.kl) for row in rows] for rows in rows_of], hparams, layer,
            sites, loss_name, templates, nll_factor, adaptive_nll, EARLY_STOP_LOSS)
        found = store.lookup(keys, S, hidden, dtype)
    missing = [r for r in range(len(requests)) if r not in found]
    loop = LayerLoop.build(model, hparams, layer, sites, loss_layer) if fast_loop and missing else None
    entries: Dict[int, "cache_mod.Entry"] = dict(found)
    with frozen_parameters(model):
        for start in range(0, len(missing), chunk):
            idx = missing[start:start + chunk]
            rows = [replace(row, request=j) for j, r in enumerate(idx) for row in rows_of[r]]
            part = _optimize_chunk(model, tok, rows, len(idx), hparams, sites, loss_name, ln_f, head,
                                   nll_factor, adaptive_nll, progress, loop)
            for r, entry in zip(idx, cache_mod.split_result(*part)):
                entries[r] = entry
                if store is not None:
                    store.put(keys[r], entry)
    if use_cache:
        log.info("anchors at layer %d: %d loaded from the cache, %d optimized (%s)",
                 layer, len(found), len(missing), store.root)
    site_dev = site_param.device if site_param is not None else input_device(model)
    init, delta, nll, steps = cache_mod.stack_entries([entries[r] for r in range(len(requests))], site_dev)
    return AnchorResult(layer, sites, init, delta, nll, steps)


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


class LayerLoop:
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

    def __init__(self, model, layers, start: int, loss_layer: int, block_site: Optional[str]):
        self.model = model
        self.layers = layers
        self.start = start
        self.loss_layer = loss_layer
        self.block_site = block_site  # the site when it is the output of layer start - 1
        self.captured = None
        self.captured_for = None

    @classmethod
    def build(cls, model, hparams, layer: int, sites: Sequence[str], loss_layer: int) -> Optional["LayerLoop"]:
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
        return cls(model, layers, start, loss_layer, block_site)

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


def _optimize_chunk(model, tok, rows: List[_Row], n_req: int, hparams, sites, loss_name, ln_f, head,
                    nll_factor, adaptive_nll, progress, loop: Optional[LayerLoop] = None):
    dev = input_device(model)
    pad = pad_id_of(tok)
    if loop is not None:
        loop.captured = loop.captured_for = None  # row indices are per chunk
    site_dev = next(resolve_module(model, sites[0]).parameters(), torch.empty(0, device=dev)).device
    hidden = hidden_size(model)
    S = len(sites)
    delta = torch.zeros((S, n_req, hidden), dtype=torch.float32, device=site_dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    init = [None] * S
    kl_init = None
    lm_w = head.weight
    lm_b = getattr(head, "bias", None)
    keep_arg = _accepts_logits_to_keep(model)

    active = torch.ones(n_req, dtype=torch.bool)
    factor = torch.full((n_req,), float(nll_factor))
    final_nll = torch.full((n_req,), float("nan"))
    steps = torch.zeros(n_req, dtype=torch.long)
    n_steps = int(hparams.v_num_grad_steps)
    iterator = range(n_steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"anchors ({n_req} requests)", leave=False)
    for it in iterator:
        live = [i for i, row in enumerate(rows) if active[row.request]]
        batch = [rows[i] for i in live]
        ids, mask = pad_right([row.ids for row in batch], pad, dev)
        row_req = torch.tensor([row.request for row in batch])
        looks = torch.tensor([row.lookup for row in batch])
        b_rows = torch.arange(len(batch))
        first = [i for i, row in enumerate(batch) if row.first]
        first_req = [batch[i].request for i in first]

        def make_edit(s):
            def edit(h):
                if init[s] is None:
                    rec = torch.empty((n_req, h.shape[-1]), dtype=h.dtype, device=h.device)
                    rec[first_req] = h[first, looks[first].to(h.device)].detach()
                    init[s] = rec
                return add_at_positions(h, b_rows, looks, delta[s][row_req.to(delta.device)])

            return edit

        edits = {s: make_edit(i) for i, s in enumerate(sites)}
        kl_idx = [i for i, row in enumerate(batch) if row.kl]
        kl_req = [batch[i].request for i in kl_idx]

        def full_forward():
            kl_positions = sorted({batch[i].lookup for i in kl_idx})
            extra = {}
            if keep_arg:
                extra["logits_to_keep"] = torch.tensor(kl_positions, device=dev)
            trace = Trace(model, outputs=[loss_name], edits=edits, detach=False)
            logits = run(model, trace, input_ids=ids, attention_mask=mask, **extra).logits
            if keep_arg:
                pos_col = {p: j for j, p in enumerate(kl_positions)}
                kl_logits = logits[kl_idx, [pos_col[batch[i].lookup] for i in kl_idx]]
            else:
                kl_logits = logits[kl_idx, [batch[i].lookup for i in kl_idx]]
            return kl_logits, trace.outputs[loss_name]

        def fast_forward():
            loop.capture(ids, mask, tuple(live))
            h_loss, h_last = loop.forward(loss_name, edits)
            sel = h_last[torch.tensor(kl_idx, device=h_last.device),
                         torch.tensor([batch[i].lookup for i in kl_idx], device=h_last.device)]
            return unembed(ln_f, lm_w, lm_b, sel), h_loss

        def losses(kl_logits, h_loss):
            nonlocal kl_init
            kl_logp = torch.log_softmax(kl_logits.float(), dim=-1)
            if kl_init is None:
                kl_init = torch.empty((n_req, kl_logp.shape[-1]), dtype=kl_logp.dtype, device=kl_logp.device)
                kl_init[kl_req] = kl_logp.detach()
            nll = _target_nll(batch, h_loss, ln_f, lm_w, lm_b, n_req)
            kl_val = (kl_logp.exp() * (kl_logp - kl_init[kl_req])).sum(-1)
            kl_req_t = torch.zeros(n_req, device=nll.logp.device).index_add(
                0, torch.tensor(kl_req, device=nll.logp.device), kl_val)
            wd = torch.zeros(n_req, device=nll.logp.device)
            for s in range(S):
                wd = wd + (delta[s].norm(dim=-1) / init[s].float().norm(dim=-1).to(delta.device) ** 2).to(nll.logp.device)
            wd = hparams.v_weight_decay * wd
            loss_req = factor.to(nll.logp.device) * nll.nll_req + hparams.kl_factor * kl_req_t + wd
            return loss_req, nll, kl_req_t

        if loop is None or it == 0:
            loss_req, nll, kl_req_t = losses(*full_forward())
            if loop is not None:
                loop = _check_fast(loop, fast_forward, losses, loss_req, active, sites)
        else:
            loss_req, nll, kl_req_t = losses(*fast_forward())
        logp, owner, lengths, nll_row, rew_req, counts, nll_req = (
            nll.logp, nll.owner, nll.lengths, nll.nll_row, nll.rew_req, nll.counts, nll.nll_req)
        n_rew = len(nll_row)
        if not torch.isfinite(loss_req[active.to(loss_req.device)]).all():
            bad = [i for i in range(n_req) if active[i] and not torch.isfinite(loss_req[i])]
            raise NumericalError(f"anchor optimization at layer sites {sites}: non-finite loss for request(s) {bad} at step {it}")

        loss_d = loss_req.detach().cpu()
        done = active & (loss_d < EARLY_STOP_LOSS)
        if adaptive_nll:
            max_logp = logp.detach().max(-1).values
            max_row = torch.zeros(n_rew, device=logp.device).index_add(0, owner, max_logp) / lengths
            maxprob_req = torch.zeros(n_req, device=logp.device).index_add(0, rew_req, max_row.exp())
            prob_req = torch.zeros(n_req, device=logp.device).index_add(0, rew_req, (-nll_row.detach()).exp())
            maxprob_req, prob_req = (maxprob_req / counts.clamp(min=1)).cpu(), (prob_req / counts.clamp(min=1)).cpu()
            argmax = maxprob_req == prob_req
            kl_small = (hparams.kl_factor * kl_req_t.detach()).cpu() <= 0.01  # compute_zs: kl_loss (weighted) <= 0.01
            done |= active & ~done & argmax & kl_small
            factor = torch.where(argmax, 0.1 * nll_factor, float(nll_factor))
        if it == n_steps - 1:
            done = active.clone()
        final_nll[done] = nll_req.detach().cpu()[done]
        steps[done] = it + 1
        active = active & ~done
        if not active.any():
            break
        total = loss_req[active.to(loss_req.device)].sum()
        opt.zero_grad()
        total.backward()
        frozen = delta.detach()[:, ~active.to(delta.device)].clone()
        opt.step()
        with torch.no_grad():
            delta[:, ~active.to(delta.device)] = frozen
            for s in range(S):
                max_norm = hparams.clamp_norm_factor * init[s].float().norm(dim=-1).to(delta.device)
                norms = delta[s].norm(dim=-1)
                scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
                scale = torch.where(active.to(delta.device), scale, torch.ones_like(scale))
                delta[s] *= scale[:, None]
    result_delta = delta.detach()
    if not torch.isfinite(result_delta).all():
        raise NumericalError(f"anchor optimization produced a non-finite delta at sites {sites}")
    return torch.stack(init, 0), result_delta, final_nll, steps


# Step-0 agreement of the loop from the anchor layer with the full forward pass:
# |loss_fast - loss_full| <= FAST_ATOL + FAST_RTOL * |loss_full| per request.
FAST_RTOL, FAST_ATOL = 1e-4, 1e-5
LAST_FAST_CHECK: Dict[str, float] = {}  # max abs loss difference of the latest check (tests, benchmark)


def _check_fast(loop: LayerLoop, fast_forward, losses, loss_full, active, sites) -> Optional[LayerLoop]:
    """Run the fast pass without gradients and compare its per-request loss with the full
    pass's ``loss_full [R]``; the loop to use for the rest of the chunk (None: full pass)."""
    try:
        with torch.no_grad():
            loss_fast = losses(*fast_forward())[0]
    except Exception as exc:  # an unsupported layer signature, a recorder mismatch, ...
        log.warning("anchor loop from the anchor layer failed at step 0 (%s: %s); using the full forward pass",
                    type(exc).__name__, exc)
        return None
    full = loss_full.detach()[active.to(loss_full.device)]
    fast = loss_fast[active.to(loss_fast.device)].to(full.device)
    gap = (fast - full).abs()
    LAST_FAST_CHECK.update(max_abs=float(gap.max()), max_loss=float(full.abs().max()))
    if not torch.isfinite(fast).all() or bool((gap > FAST_ATOL + FAST_RTOL * full.abs()).any()):
        log.warning("anchor loop from the anchor layer disagrees with the full forward pass at sites %s "
                    "(max loss difference %.3e); using the full forward pass for this chunk", sites, float(gap.max()))
        return None
    return loop


@dataclass
class _NLL:
    logp: torch.Tensor      # [P, V] log-probabilities at every target position
    owner: torch.Tensor     # [P] index of the rewriting row of each position
    lengths: torch.Tensor   # [n_rows] target length per rewriting row
    nll_row: torch.Tensor   # [n_rows] per-token NLL per rewriting row
    rew_req: torch.Tensor   # [n_rows] request of each rewriting row
    counts: torch.Tensor    # [n_req] rewriting rows per request
    nll_req: torch.Tensor   # [n_req] mean NLL over each request's rewriting rows


def unembed(ln_f, lm_w: torch.Tensor, lm_b: Optional[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` float32 logits ``ln_f(h) @ W^T (+ b)`` of hidden states ``h [N, d]``, computed where
    the modules live: ``h`` moves to ``ln_f``'s device, the result to the unembedding's,
    never the other way (the unembedding of a 128k-vocabulary model is the largest matrix).
    EasyEdit's ``compute_z`` reads ``ln_f`` and ``{lm_head_module}.weight`` the same way."""
    norm_param = next(ln_f.parameters(), None)
    if norm_param is not None and norm_param.device.type != "meta":
        h = h.to(norm_param.device)
    logits = ln_f(h).to(lm_w.device).float() @ lm_w.float().T  # float32 logits for half-precision models too
    return logits if lm_b is None else logits + lm_b.float()


def _target_nll(batch: List[_Row], h_loss: torch.Tensor, ln_f, lm_w, lm_b, n_req: int) -> _NLL:
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
    logp = torch.log_softmax(unembed(ln_f, lm_w, lm_b, sel).float(), dim=-1)
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
    ln_f = resolve_module(model, hparams.ln_f_module, "ln_f_module")
    head = resolve_module(model, hparams.lm_head_module, "lm_head_module")
    ids, mask = pad_right([row.ids for row in rows], pad_id_of(tok), input_device(model))
    with torch.no_grad():
        trace = Trace(model, outputs=[loss_name], stop_when_done=True)
        run(model, trace, input_ids=ids, attention_mask=mask)
        nll = _target_nll(rows, trace.outputs[loss_name], ln_f, head.weight, getattr(head, "bias", None), len(requests))
    return nll.nll_req.cpu()

