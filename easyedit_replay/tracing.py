"""Forward hooks that read or add to module inputs/outputs, and stop a forward pass.

Small and composable, in the spirit of baukit's ``nethook``: a :class:`Trace`
registers hooks on named modules for the duration of a ``with`` block. Module
outputs may be tensors or tuples whose first element is the hidden state (both
occur across transformers versions); inputs are the first positional argument or,
for decoder blocks called with keywords, the ``hidden_states`` keyword.
"""

from __future__ import annotations

import difflib
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from .errors import HyperParamsError


class StopForward(Exception):
    """Raised by a hook to end a forward pass after the last module of interest."""


def hidden_of(output):
    """The hidden-state tensor of a module output (tensor, or first item of a tuple/list):
    ``[B, T, d]`` for a block or projection output.

    Raises:
        TypeError: ``output`` is neither a tensor nor a non-empty tuple/list starting with one.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot read a hidden state from a module output of type {type(output).__name__}")


def with_hidden(output, hidden: torch.Tensor):
    """``output`` with its hidden-state tensor replaced by ``hidden`` (same container type)."""
    if isinstance(output, torch.Tensor):
        return hidden
    items = list(output)
    items[0] = hidden
    return type(output)(items) if isinstance(output, tuple) else items


def module_names(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` for every submodule of ``model`` (``named_modules``, ``""`` the model)."""
    return dict(model.named_modules())


def resolve_module(model: nn.Module, name: str, field: str = "module") -> nn.Module:
    """The submodule called ``name``.

    Raises:
        HyperParamsError: no such module; the message names ``field`` and the closest
            existing module names.
    """
    modules = module_names(model)
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.5)
    hint = f" closest names on this model: {close}" if close else ""
    raise HyperParamsError(
        f"hparams.{field} resolves to {name!r}, which is not a module of "
        f"{type(model).__name__};{hint} fix the template in the YAML"
    )


def resolve_parameter(model: nn.Module, name: str, field: str = "rewrite_module_tmp") -> nn.Parameter:
    """The parameter called ``name`` (e.g. ``model.layers.4.mlp.down_proj.weight``).

    Raises:
        HyperParamsError: no such module (naming ``field`` and close names), or the
            module has no parameter of that name.
    """
    params = dict(model.named_parameters())
    if name in params:
        return params[name]
    module_name = name.rsplit(".", 1)[0]
    resolve_module(model, module_name, field)  # raises with a helpful message if missing
    raise HyperParamsError(f"hparams.{field}: module {module_name!r} has no parameter {name.rsplit('.', 1)[1]!r}")


def _first_input(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("module was called without a tensor input")


class Trace:
    """Hooks on named modules for the duration of a ``with`` block.

    Args:
        model: the network.
        outputs: names of modules whose output hidden state is recorded in
            ``self.outputs[name]`` (after any edit).
        inputs: names of modules whose input is recorded in ``self.inputs[name]``.
        edits: ``{name: fn}``; ``fn(hidden) -> hidden`` replaces the module's output
            hidden state (shape ``[batch, seq, d]``); it may keep gradients.
        detach: detach recorded tensors (default True).
        stop_when_done: abort the forward pass as soon as every requested input
            and output has been recorded.
    """

    def __init__(
        self,
        model: nn.Module,
        outputs: Iterable[str] = (),
        inputs: Iterable[str] = (),
        edits: Optional[Dict[str, Callable[[torch.Tensor], torch.Tensor]]] = None,
        detach: bool = True,
        stop_when_done: bool = False,
    ):
        self.model = model
        self.want_out = set(outputs)
        self.want_in = set(inputs)
        self.edits = dict(edits or {})
        self.detach = detach
        self.stop_when_done = stop_when_done and bool(self.want_out or self.want_in)
        self.outputs: Dict[str, torch.Tensor] = {}
        self.inputs: Dict[str, torch.Tensor] = {}
        self._handles = []

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            if name in self.want_in:
                x = _first_input(args, kwargs)
                self.inputs[name] = x.detach() if self.detach else x
            if name in self.edits:
                output = with_hidden(output, self.edits[name](hidden_of(output)))
            if name in self.want_out:
                h = hidden_of(output)
                self.outputs[name] = h.detach() if self.detach else h
            if (
                self.stop_when_done
                and len(self.outputs) == len(self.want_out)
                and len(self.inputs) == len(self.want_in)
            ):
                raise StopForward()
            return output

        return hook

    def __enter__(self):
        names = self.want_out | self.want_in | set(self.edits)
        modules = module_names(self.model)
        for name in sorted(names):
            if name not in modules:
                resolve_module(self.model, name)
            self._handles.append(modules[name].register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def run(model: nn.Module, trace: Optional[Trace] = None, **batch):
    """Run ``model(**batch)`` inside ``trace``; return the output, or None if stopped early."""
    batch.setdefault("use_cache", False)
    if trace is None:
        return model(**batch)
    with trace:
        try:
            return model(**batch)
        except StopForward:
            return None


def add_at_positions(hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor):
    """Out-of-place ``hidden[rows, cols] += values`` that keeps gradients of ``values``.

    Shapes: ``hidden [B, T, d]``, ``rows``/``cols`` ``[n]`` long, ``values [n, d]``.
    """
    values = values.to(device=hidden.device, dtype=hidden.dtype)
    return hidden.index_put((rows.to(hidden.device), cols.to(hidden.device)), values, accumulate=True)
