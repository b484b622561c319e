"""Half-precision weights, full-precision edit math.

A model in bfloat16 or float16 is edited with its edit window in float32: while
:func:`~easyedit_replay.editor.compute_edit` runs, the decoder layers ``l_1 ..
l_n + 1`` (``hparams.layers`` plus one) are cast to float32; the hidden state is
cast to float32 where it enters ``l_1`` and back to the model dtype where it
enters the first layer after the window (or the final norm). So, for a
half-precision model:

- statistics: the rewrite modules' inputs come from float32 layers and are
  accumulated in ``mom2_dtype`` (float32 by default);
- anchors: the delta is a float32 tensor, added to a float32 state when the anchor
  layer lies in the window (always, for both ``l_1`` and ``l_n``); the NLL and KL
  are computed from float32 logits (``anchor._Readout.logits``);
- keys, current states and replayed targets are read from float32 layers;
- the solve runs in float64 (MEMIT, PMET, EMMET) or float32 (AlphaEdit), as for a
  float32 model;
- the update is cast to the weight dtype once, when it is written
  (:func:`~easyedit_replay.editor.apply_plan`: ``round(W + dW)``).

Layers outside the window (the embedding, layers before ``l_1``, the anchor
loop's later layers and the head) run in the model dtype, so the extra memory is
the window's float32 copy (5-6 layers of a 7B model: about 4 GB). The window
exists only inside ``compute_edit``; the weights are cast back bit-identically,
each tensor to its own dtype (the float32 copies hold the half-precision values, a
tensor the model keeps in float32 stays float32, and every write inside
``compute_edit`` is undone before the cast back).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Optional

import torch

from .model_info import num_layers
from .tracing import resolve_module

HALF_DTYPES = (torch.float16, torch.bfloat16)


def weight_dtype(model) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _cast_hidden(dtype):
    def hook(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return (args[0].to(dtype),) + tuple(args[1:]), kwargs
        h = kwargs.get("hidden_states")
        if isinstance(h, torch.Tensor) and h.is_floating_point():
            return args, {**kwargs, "hidden_states": h.to(dtype)}
        return args, kwargs

    return hook


@contextmanager
def float32_window(model, hparams):
    """Run the edit window (decoder layers ``l_1 .. l_n + 1``) in float32 for the block.

    No-op for a model whose weights are not float16/bfloat16. The layers are found
    with ``hparams.layer_module_tmp``; the window's exit is the next layer or, when
    the window reaches the last layer, ``hparams.ln_f_module``.

    Raises:
        HyperParamsError: a layer template or ``ln_f_module`` that names no module.
    """
    dtype = weight_dtype(model)
    if dtype not in HALF_DTYPES:
        yield
        return
    first, last = min(hparams.layers), max(hparams.layers)
    n = num_layers(model)
    stop = last + 1 if n is None else min(last + 1, n - 1)
    window = [resolve_module(model, hparams.layer_module_tmp.format(l), "layer_module_tmp") for l in range(first, stop + 1)]
    exit_module: Optional[torch.nn.Module] = None
    if n is not None and stop + 1 < n:
        exit_module = resolve_module(model, hparams.layer_module_tmp.format(stop + 1), "layer_module_tmp")
    else:
        exit_module = resolve_module(model, hparams.ln_f_module, "ln_f_module")
    # each floating tensor's own dtype, so a tensor kept in float32 (a norm of a model with
    # ``_keep_in_fp32_modules``) is not cast down to the model dtype on the way back
    kept = [(module, table, key, t.dtype) for layer in window for module in layer.modules()
            for table in ("_parameters", "_buffers") for key, t in getattr(module, table).items()
            if t is not None and t.is_floating_point()]
    handles = []
    try:
        for layer in window:
            layer.float()
        handles.append(window[0].register_forward_pre_hook(_cast_hidden(torch.float32), with_kwargs=True))
        handles.append(exit_module.register_forward_pre_hook(_cast_hidden(dtype), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for module, table, key, own in kept:
            t = getattr(module, table)[key]
            if table == "_parameters":
                t.data = t.data.to(own)
            else:
                module._buffers[key] = t.to(own)


def in_float32_window(fn):
    """Decorator for ``fn(model, tok, requests, hparams, ...)``: run it inside
    :func:`float32_window` of ``model`` and ``hparams``."""

    @functools.wraps(fn)
    def run(model, tok, requests, hparams, *args, **kwargs):
        with float32_window(model, hparams):
            return fn(model, tok, requests, hparams, *args, **kwargs)

    return run
