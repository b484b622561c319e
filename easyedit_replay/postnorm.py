"""Post-norm MLP blocks (Gemma 2/3): where the edit's target lives and how a change of the
block output becomes a change of the rewritten module's output.

In a LLaMA block the rewritten projection (``down_proj``, output ``m = W k``) is added
to the residual stream as it is: ``h = a + m`` (``a``: the stream after attention). A
change ``r`` of ``m`` is a change ``r`` of ``h``, which is what MEMIT and its family
assume. Gemma 2 and 3 pass ``m`` through an RMSNorm first (``post_feedforward_layernorm``):

    h = a + N(m),    N(m) = g * m / sqrt(mean(m^2) + eps)        (g = 1 + weight in Gemma)

so ``h`` does not move by ``r`` when ``m`` does. docs/method.md, "Post-norm MLP blocks
(Gemma 2/3)", derives what this module computes:

- **Detection** (:func:`post_norms`): from the model, not its name. One forward pass of
  a few tokens follows the rewritten module's output tensor through the decoder layer:
  modules that pass it on unchanged (dropout in eval) are followed, and the first module
  that transforms it is the post-norm, which must then behave as an RMSNorm
  (``N(c x) = N(x)`` and ``N(x) = g * x / rms(x)`` on a random ``x``; ``g`` is read
  from ``N`` itself, so the ``1 + weight`` convention needs no special case). No
  consumer: the block is additive (LLaMA, Qwen, Mistral, GPT-J) and nothing changes.
- **Anchor** (:func:`anchor_templates`): optimized on the rewritten module's output (the
  value the edited weight actually writes; the delta passes through the post-norm in
  the forward pass), so the anchor layer's target is reachable by the edit.
- **Targets**: block outputs (residual-stream states), as on every other model: at the
  anchor layer one forward pass with the delta added reads it; replay reads the later
  layers' block outputs as before.
- **Residual** (:meth:`PostNorm.rewrite_residual`): a desired block-output change
  ``Delta`` asks for ``N(m') = N(m) + Delta = u``. ``N``'s outputs fill only the surface
  ``{g * w : |w|^2 = d}``, so ``u`` is first replaced by the nearest point of that
  surface (:func:`nearest_reachable`; ``u`` itself when reachable). Every ``m' = s w``,
  ``s > 0``, gives that output (``N`` is scale-invariant); the one taken is where the ray
  crosses the tangent plane of ``m``, within ``clamp_norm_factor * |m|`` of ``m``
  (:func:`tangent_point`): the change ``m' - m`` then has no component along ``m``, the
  direction the norm discards, so a rule that realizes a fraction of it moves the block
  output by about that fraction, as on an additive block.
  The rule gets ``m' - m`` with a divisor of 1 (the construction's share was taken in
  block-output space).

``post_norm: additive`` in the YAML turns all of this off (stock EasyEdit's assumption).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .batching import input_device
from .errors import HyperParamsError, field_error
from .hparams import POST_NORM_MODES  # noqa: F401  (the values of hparams.post_norm)
from .model_info import hidden_size
from .tracing import StopForward, hidden_of, resolve_module

RMS_CHECK_RTOL = 1e-4  # the consumer must match g * x / sqrt(mean(x^2) + eps) this closely (float32)
BISECTION_STEPS = 200


@dataclass
class PostNorm:
    """The RMSNorm between the rewritten module of one layer and the residual stream.

    Attributes:
        name: formatted module name (e.g. ``model.layers.4.post_feedforward_layernorm``).
        module: the norm itself (applied as the model applies it).
        gain: ``[d]`` float64 ``g`` with ``N(x) = g * x / sqrt(mean(x^2) + eps)``.
        eps: the norm's epsilon (0 when the module names none).
    """

    name: str
    module: nn.Module
    gain: torch.Tensor
    eps: float

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        """``[R, d]`` ``N(m)`` as the model computes it (module dtype and device), float64."""
        p = next(self.module.parameters(), None)
        x = m.to(device=p.device, dtype=p.dtype) if p is not None else m
        with torch.no_grad():
            return self.module(x).double()

    def rewrite_residual(self, change: torch.Tensor, current: torch.Tensor, bound: float) -> torch.Tensor:
        """``[R, d]`` float64 change ``r`` of the rewritten module's output that moves the
        block output by ``change`` as closely as the norm allows.

        Args:
            change: ``[R, d]`` desired change of the block output (the residual after the
                construction's share, block-output space).
            current: ``[R, d]`` the rewritten module's output now (``m``), at the same
                lookup tokens.
            bound: ``clamp_norm_factor``, the anchor objective's bound on ``|delta| / |m|``.

        Returns:
            ``r = m' - m`` with ``m'`` on the ray of ``w`` (:func:`nearest_reachable` of
            ``N(m) + change``) where it crosses the tangent plane of ``m``, within
            ``bound * |m|`` (:func:`tangent_point`; docs/method.md, "Post-norm MLP blocks").
        """
        m = current.double().to(self.gain.device)
        u = self.apply(current).to(self.gain.device) + change.double().to(self.gain.device)
        return tangent_point(nearest_reachable(u, self.gain, m), m, bound)


def nearest_reachable(u: torch.Tensor, gain: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``[R, d]`` float64 ``w`` with ``|w|^2 = d`` minimizing ``|g * w - u|`` (per row): the
    output of ``N(x) = g * x / rms(x)`` nearest to ``u`` is ``g * w`` (eps aside).

    Lagrange: ``w_j = g_j u_j / (g_j^2 + mu)`` with ``sum_j (g_j u_j)^2 / (g_j^2 + mu)^2 = d``
    and ``mu > -min g^2`` (the global minimum of the distance to an ellipsoid), found by
    bisection (the sum decreases in ``mu``). A reachable ``u = g * w0`` gives ``mu = 0`` and
    ``w = w0``. The "hard case": when ``u`` has no component on the axes of the smallest
    gain (always, for a gain of exactly 0, which Q4_K_M rounding gives Gemma's layer 3) and
    the sum stays at or below ``d`` down to ``mu = -min g^2``, those axes take the length
    that is left, in the direction of ``current`` there (least change).

    Args:
        u: ``[R, d]`` desired outputs of the norm.
        gain: ``[d]`` the norm's gain ``g``.
        current: ``[R, d]`` the norm's current input (for the hard case's direction).

    Raises:
        ValueError: ``u`` and ``gain`` disagree in width.
    """
    u = u.double()
    g = gain.double().to(u.device)
    m = current.double().to(u.device)
    if u.shape[-1] != g.shape[0]:
        raise ValueError(f"nearest_reachable: u has width {u.shape[-1]}, the gain {g.shape[0]}")
    d = float(g.shape[0])
    gu, g2 = g * u, g * g
    g2min = g2.min()
    tie = g2 <= g2min  # the axes of the smallest gain, [d]
    gap = torch.where(tie, torch.ones_like(g2), g2 - g2min)
    off_tie = torch.where(tie, torch.zeros_like(gu), gu / gap)
    hard = (gu[..., tie] == 0).all(-1) & ((off_tie ** 2).sum(-1) <= d)  # [R]
    lo = torch.full(u.shape[:-1], -float(g2min), dtype=torch.float64, device=u.device)
    hi = gu.norm(dim=-1) / math.sqrt(d) + 1e-12  # the sum is below d from here on
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        over = ((gu / (g2 + mid[..., None])) ** 2).sum(-1) > d
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    w = gu / (g2 + hi[..., None])  # hi: the side where the sum is <= d, off the pole at -min g^2
    # the hard case: the tied axes fill |w|^2 = d along the current input's direction there
    along = torch.where(tie, m, torch.zeros_like(m))
    first = torch.zeros_like(m)
    first[..., int(tie.nonzero()[0])] = 1.0
    along = torch.where(along.norm(dim=-1, keepdim=True) > 0, along, first)
    fill = (d - (off_tie ** 2).sum(-1, keepdim=True)).clamp_min(0).sqrt()
    w = torch.where(hard[..., None], off_tie + fill * along / along.norm(dim=-1, keepdim=True), w)
    return w * (math.sqrt(d) / w.norm(dim=-1, keepdim=True))


def tangent_point(w: torch.Tensor, m: torch.Tensor, bound: float) -> torch.Tensor:
    """``[R, d]`` float64 ``r = m' - m`` for a norm input ``m`` and a target direction ``w``.

    Every point ``m' = s w``, ``s > 0``, of the ray gives the block the same output (the
    norm is scale-invariant). The one taken lies on the tangent plane of ``m``
    (``<r, m> = 0``, the gnomonic projection of ``w``: ``s = |m| / cos(theta)``, ``theta``
    the angle between ``m`` and ``w``), or, when that point is farther than
    ``bound * |m|`` from ``m``, the point of the ray within that distance nearest to the
    plane. ``bound`` is ``clamp_norm_factor``, the bound the anchor objective puts on its
    own change of this output, so the anchor's own value is always within reach at the
    anchor layer. Where no point of the ray is within reach, or ``theta >= 90`` degrees
    (every point then shrinks ``m``), ``r`` is the step of length ``bound * |m|`` along the
    tangent toward ``w``.

    Why the tangent plane: the norm's Jacobian ``g / rms(m) (I - m m^T / |m|^2)``
    annihilates changes along ``m``, so a change with no such component moves the block
    output, to first order, by the whole Jacobian image of ``r``, and a rule that realizes
    a fraction of ``r`` (a regularized solve always does) moves the block output by about
    that fraction, as on an additive block. A change with a component along ``m`` spends
    part of the update on a direction the block never sees.

    Args:
        w: ``[R, d]`` target directions (any positive scale).
        m: ``[R, d]`` the norm's current inputs.
        bound: ``clamp_norm_factor`` (> 0).
    """
    w, m = w.double(), m.double().to(w.device)
    m_norm = m.norm(dim=-1, keepdim=True)
    m_hat = m / m_norm.clamp_min(1e-300)
    w_hat = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = (w_hat * m_hat).sum(-1, keepdim=True)
    t = w_hat - cos * m_hat  # toward w along the tangent plane, |t| = sin(theta)
    sin = t.norm(dim=-1, keepdim=True)
    # |s w_hat - m| <= bound |m|  <=>  s in [s_lo, s_hi] (in units of |m|)
    disc = bound ** 2 - sin ** 2
    reach = (disc >= 0) & (cos > 0)
    root = disc.clamp_min(0).sqrt()
    s_lo, s_hi = (cos - root).clamp_min(0), cos + root
    s = torch.minimum(torch.maximum(1 / cos.clamp_min(1e-300), s_lo), s_hi)  # tangent point, clamped
    on_ray = m_norm * s * w_hat - m
    step = bound * m_norm * t / sin.clamp_min(1e-300)
    return torch.where(reach, on_ray, torch.where(sin > 0, step, torch.zeros_like(m)))


def _first_tensor(args, kwargs) -> Optional[torch.Tensor]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def consumer_of_output(model: nn.Module, layer_module: str, rewrite_module: str,
                       probe_ids: Optional[torch.Tensor] = None) -> Optional[str]:
    """The first module inside ``layer_module`` that transforms the output of
    ``rewrite_module`` (a name), or None when the output reaches the block's sum untouched.

    One no-grad forward pass on ``probe_ids`` (default: four token ids 0), stopped after
    the layer. Every module inside the layer is hooked; a module whose input IS the
    rewritten module's output (or a tensor equal to it that a module passed on unchanged,
    such as dropout in eval) and whose output differs is the consumer.
    """
    layer = resolve_module(model, layer_module, "layer_module_tmp")
    source = resolve_module(model, rewrite_module, "rewrite_module_tmp")
    inside = {mod: name for name, mod in layer.named_modules(prefix=layer_module)}
    aliases: List[torch.Tensor] = []
    found: List[str] = []
    handles = []

    def on_source(module, args, output):
        aliases.append(hidden_of(output))

    def on_module(module, args, kwargs, output):
        x = _first_tensor(args, kwargs)
        if x is None or found or not any(x is a for a in aliases):
            return
        try:
            y = hidden_of(output)
        except TypeError:
            return
        if y is x or (y.shape == x.shape and torch.equal(y, x)):
            aliases.append(y)  # passed on unchanged
        else:
            found.append(inside[module])

    def stop(module, args, output):
        raise StopForward()

    try:
        handles.append(source.register_forward_hook(on_source))
        for mod in inside:
            if mod is not layer and mod is not source:
                handles.append(mod.register_forward_hook(on_module, with_kwargs=True))
        handles.append(layer.register_forward_hook(stop))
        ids = probe_ids if probe_ids is not None else torch.zeros((1, 4), dtype=torch.long)
        with torch.no_grad():
            try:
                model(input_ids=ids.to(input_device(model)), use_cache=False)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def rms_norm_of(module: nn.Module, name: str, rewrite_module: str, width: int) -> PostNorm:
    """Read ``module`` as an RMSNorm ``N(x) = g * x / sqrt(mean(x^2) + eps)``: ``g`` from
    ``N(1) * sqrt(1 + eps)``, ``eps`` from the module's ``eps`` / ``variance_epsilon``
    (0 when it has none), then checked on a random ``x`` (relative error below
    :data:`RMS_CHECK_RTOL`, or 8 rounding units of a half-precision norm) and for scale
    invariance.

    Raises:
        HyperParamsError: the module is not an RMSNorm of width ``width`` (the message
            names it and the fix: ``post_norm: additive``).
    """
    p = next(module.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 0.0)) or 0.0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((2, width), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ones = module(torch.ones((1, width), dtype=dtype, device=device)).double().cpu()[0]
        gain = ones * math.sqrt(1.0 + eps)
        y = module(x.to(device=device, dtype=dtype)).double().cpu()
        y10 = module((10 * x).to(device=device, dtype=dtype)).double().cpu()
    expect = gain * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    scale = expect.norm()
    rtol = max(RMS_CHECK_RTOL, 8 * torch.finfo(dtype).eps)
    if not (torch.isfinite(y).all() and (y - expect).norm() <= rtol * scale
            and (y10 - y).norm() <= 10 * rtol * scale):
        raise HyperParamsError(
            f"the output of {rewrite_module} passes through {name} ({type(module).__name__}) before the "
            f"residual stream, and it is not an RMSNorm (N(x) = g * x / rms(x)), the only post-norm the "
            f"plugin inverts; set post_norm: additive in the YAML to edit with the stock assumption")
    return PostNorm(name, module, gain, eps)


def post_norms(model: nn.Module, hparams, sites: Sequence) -> Dict[int, PostNorm]:
    """``{layer: PostNorm}`` for every edit layer whose block-output site (a site whose
    target is ``layer_module_tmp``: MEMIT, EMMET, AlphaEdit) writes through a post-norm;
    ``{}`` for additive blocks (LLaMA, ...), for rules whose targets are module outputs
    (PMET: the module's own output is what its weight writes) and with
    ``hparams.post_norm == "additive"``.

    Raises:
        HyperParamsError: some edit layers have a post-norm and others do not, or the
            post-norm is not an RMSNorm (:func:`rms_norm_of`).

    Source: docs/method.md, "Post-norm MLP blocks (Gemma 2/3)".
    """
    mode = getattr(hparams, "post_norm", "invert")
    block_sites = [s for s in sites if s.target.template == hparams.layer_module_tmp]
    if mode == "additive" or not block_sites:
        return {}
    rewrite_tmp = block_sites[0].rewrite_template
    width = hidden_size(model)
    found: Dict[int, Optional[PostNorm]] = {}
    for layer in hparams.layers:
        rewrite = rewrite_tmp.format(layer)
        name = consumer_of_output(model, hparams.layer_module_tmp.format(layer), rewrite)
        found[layer] = None if name is None else rms_norm_of(resolve_module(model, name), name, rewrite, width)
    with_norm = [l for l, p in found.items() if p is not None]
    if with_norm and len(with_norm) != len(found):
        raise field_error(HyperParamsError, "layers", list(hparams.layers),
                          f"layers {with_norm} write {rewrite_tmp} through a norm and layers "
                          f"{[l for l in found if found[l] is None]} do not; edit layers of one kind")
    return {l: p for l, p in found.items() if p is not None}


def anchor_templates(templates: Sequence[str], hparams, norms: Dict[int, PostNorm]) -> List[str]:
    """The anchor sites: ``templates`` (the rule's) with the block output
    (``layer_module_tmp``) replaced by ``rewrite_module_tmp`` when the block writes
    through a post-norm (``norms`` not empty), so that the anchor is a value the edited
    weight can write; unchanged otherwise."""
    if not norms:
        return list(templates)
    return [hparams.rewrite_module_tmp if t == hparams.layer_module_tmp else t for t in templates]
