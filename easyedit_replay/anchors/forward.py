"""The anchor loop's forward pass with deltas, two ways, and the check between them.

A :class:`DeltaForward` runs one step's :class:`~easyedit_replay.anchors.objective.Batch`
with the deltas added at the sites and returns what the objective reads: the KL prompts'
next-token logits and the loss layer's output. :class:`FullForward` runs the whole
model; :class:`LayerLoop` runs only the decoder layers from the anchor layer on (the
states before it do not depend on the delta). :func:`check_fast` compares the two on the
first step of every chunk and returns the gap (:class:`FastCheck`); the loop keeps the
:class:`LayerLoop` only when they agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ..model_info import accepts_logits_to_keep
from ..tracing import StopForward, Trace, hidden_of, run
from .objective import Batch, Objective, Readout

log = logging.getLogger(__name__)

_WARNED = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("anchor loop: %s; using the full forward pass", reason)


class DeltaForward:
    """The anchor loop's "forward with deltas": ``forward(batch, edits) -> (kl_logits [K, V],
    h_loss [B, T, d])`` for a :class:`~easyedit_replay.anchors.objective.Batch` of ``B`` rows,
    with ``edits`` (``{site: fn}``, as in :class:`~easyedit_replay.tracing.Trace`) adding the
    deltas: the logits of the next token at the ``K`` KL prompts' lookup tokens and the loss
    layer's output. Two implementations: :class:`FullForward` (the whole model) and
    :class:`LayerLoop` (from the anchor layer on)."""

    def __call__(self, batch: Batch, edits) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class FullForward(DeltaForward):
    """:class:`DeltaForward` through the whole model (its own logits; ``logits_to_keep`` limits
    them to the KL lookup positions when the model accepts it). EasyEdit's ``compute_z`` pass."""

    def __init__(self, model, loss_name: str):
        self.model, self.loss_name = model, loss_name
        self.keep_arg = accepts_logits_to_keep(model)

    def __call__(self, batch: Batch, edits) -> Tuple[torch.Tensor, torch.Tensor]:
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
    loss of this pass with the full forward pass at step 0 of every chunk
    (:func:`check_fast`) and falls back to the full pass (with a warning) if they differ.
    """

    def __init__(self, model, layers, start: int, loss_layer: int, block_site: Optional[str], loss_name: str,
                 readout: Readout):
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
    def build(cls, model, objective: Objective, readout: Readout) -> Optional["LayerLoop"]:
        """A loop for this model and the objective's sites, or None when unsupported (warned once)."""
        tmp, layer, sites, loss_layer = objective.layer_module_tmp, objective.layer, objective.sites, objective.loss_layer
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
        for the batch ``ids``/``mask`` ``[B, T]`` (no-grad; skipped if ``key`` was captured last).

        Raises:
            RuntimeError: the model did not call every decoder layer from ``start`` on once.
        """
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

    def __call__(self, batch: Batch, edits) -> Tuple[torch.Tensor, torch.Tensor]:
        """:class:`DeltaForward`: :meth:`capture` (once per batch), :meth:`forward`, and the KL
        logits through ``ln_f`` and the unembedding at the KL prompts' lookup tokens only."""
        self.capture(batch.ids, batch.mask, batch.live)
        h_loss, h_last = self.forward(self.loss_name, edits)
        kl_idx = batch.kl_idx
        sel = h_last[torch.tensor(kl_idx, device=h_last.device),
                     torch.tensor(batch.lookups_of(kl_idx), device=h_last.device)]
        return self.readout.logits(sel), h_loss


# Step-0 agreement of the loop from the anchor layer with the full forward pass:
# |loss_fast - loss_full| <= FAST_ATOL + FAST_RTOL * |loss_full| per request.
FAST_RTOL, FAST_ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class FastCheck:
    """The step-0 comparison of one chunk: ``gap`` the largest ``|loss_fast - loss_full|`` over
    its active requests (nan when the :class:`LayerLoop` failed), ``max_loss`` the largest
    ``|loss_full|``, and ``agrees`` whether the loop is used for the rest of the chunk."""

    gap: float
    max_loss: float
    agrees: bool


def check_fast(fast_loss: Callable[[], torch.Tensor], loss_full: torch.Tensor, active: torch.Tensor,
               sites) -> FastCheck:
    """Run ``fast_loss`` (the step's per-request loss ``[R]`` through :class:`LayerLoop`)
    without gradients and compare it with the full pass's ``loss_full [R]`` on the
    ``active [R]`` requests (within ``FAST_ATOL + FAST_RTOL * |loss_full|``). A failing or
    disagreeing loop is warned about (naming ``sites``) and not used."""
    full = loss_full.detach()[active.to(loss_full.device)]
    try:
        with torch.no_grad():
            loss_fast = fast_loss()
    except Exception as exc:  # an unsupported layer signature, a recorder mismatch, ...
        log.warning("anchor loop from the anchor layer failed at step 0 (%s: %s); using the full forward pass",
                    type(exc).__name__, exc)
        return FastCheck(float("nan"), float(full.abs().max()), False)
    fast = loss_fast[active.to(loss_fast.device)].to(full.device)
    gap = (fast - full).abs()
    check = FastCheck(float(gap.max()), float(full.abs().max()), True)
    if not torch.isfinite(fast).all() or bool((gap > FAST_ATOL + FAST_RTOL * full.abs()).any()):
        log.warning("anchor loop from the anchor layer disagrees with the full forward pass at sites %s "
                    "(max loss difference %.3e); using the full forward pass for this chunk", sites, check.gap)
        return FastCheck(check.gap, check.max_loss, False)
    return check
