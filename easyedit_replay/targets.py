"""Target construction: backward spreading (stock) vs forward replay (the paper).

This module is the only place where the two modes differ (see METHOD.md).

Edit layers ``R = [l_1 < ... < l_n]``; step ``i`` (0-based here) edits ``l_{i+1}``.

spread (MEMIT, PMET, EMMET, AlphaEdit as shipped):
    anchor at ``l_n``: ``z = h^{l_n} + delta``. At step ``i`` the current state is
    measured at ``l_n`` (with layers before ``l_i`` already edited) and the
    residual is ``(z - h^{l_n}_cur) / (n - i)`` (PMET: ``sqrt(n - i)``).

replay (``*_REPLAY``):
    anchor at ``l_1``: ``z^{l_1} = h^{l_1} + delta``. One batched no-grad forward
    pass of the unedited model on the bare prompts, with ``delta`` added to the
    anchor site's output at the lookup token, records ``z^{l_i}`` at every later
    edit layer. At step ``i`` the current state is measured at ``l_i`` itself and
    the residual is ``(z^{l_i} - h^{l_i}_cur) / (n - i)`` (PMET: ``sqrt``) with
    ``replay_share: remaining``, or ``z^{l_i} - h^{l_i}_cur`` with ``full``.

With one edit layer both modes give bit-identical targets and residuals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .anchor import AnchorResult
from .keys import EditRequest, bare_probes, read_at_lookup

MODES = ("spread", "replay")


@dataclass(frozen=True)
class TargetSite:
    """Where a target lives: ``template`` names the module whose OUTPUT is the target
    (e.g. ``model.layers.{}`` for MEMIT, ``model.layers.{}.mlp.down_proj`` for PMET),
    and ``anchor_site`` indexes the anchor delta that moves it."""

    template: str
    anchor_site: int = 0


def anchor_layer(mode: str, layers: Sequence[int]) -> int:
    """The layer whose hidden state is optimized: the last edit layer for spreading,
    the first for replay."""
    check_mode(mode)
    return layers[-1] if mode == "spread" else layers[0]


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")


@dataclass
class Targets:
    """Per-layer targets of one batch of ``R`` requests.

    ``values[(layer, site.template)]`` is ``[R, d]``: the state that ``layer``'s
    site should reach (spread: only ``l_n``; replay: every edit layer).
    """

    mode: str
    layers: List[int]
    sites: List[TargetSite]
    values: Dict[Tuple[int, str], torch.Tensor]
    share: str = "remaining"
    sqrt_share: bool = False

    def measure_layer(self, step: int) -> int:
        """Layer at which the current state is measured at ``step`` (0-based)."""
        return self.layers[-1] if self.mode == "spread" else self.layers[step]

    def target(self, step: int, site: TargetSite) -> torch.Tensor:
        """``[R, d]`` target compared with the state measured at :meth:`measure_layer`."""
        return self.values[(self.measure_layer(step), site.template)]

    def divisor(self, step: int) -> float:
        """Share of the local residual taken at ``step``: ``n - step`` (or its sqrt)."""
        if self.mode == "replay" and self.share == "full":
            return 1.0
        remaining = len(self.layers) - step
        return math.sqrt(remaining) if self.sqrt_share else float(remaining)

    def local_error(self, step: int, site: TargetSite, current: torch.Tensor) -> torch.Tensor:
        """``[R, d]`` ``target - current`` (before the share), in the model dtype or float32
        if that is wider (fp16/bf16 models).

        ``current`` is ``[R, d]``, measured at :meth:`measure_layer` with the layers
        before ``layers[step]`` already edited.
        """
        z = self.target(step, site)
        dtype = torch.promote_types(z.dtype, torch.float32)  # half-precision models: subtract in float32
        return z.to(dtype) - current.to(device=z.device, dtype=dtype)

    def residual(self, step: int, site: TargetSite, current: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """``[R, d]`` residual handed to the update rule: ``(target - current) / divisor``,
        the subtraction in the model dtype and the division in ``dtype`` (as EasyEdit:
        float64 for MEMIT/EMMET/PMET, float32 for AlphaEdit)."""
        return self.local_error(step, site, current).to(dtype) / self.divisor(step)


def build_targets(
    model,
    tok,
    requests: Sequence[EditRequest],
    hparams,
    anchor: AnchorResult,
    mode: str,
    sites: Sequence[TargetSite],
    anchor_templates: Sequence[str],
    sqrt_share: bool = False,
) -> Targets:
    """Targets for every edit layer and site.

    Args:
        anchor: optimized at :func:`anchor_layer` of ``mode``; ``anchor.sites`` are
            ``anchor_templates`` formatted with that layer.
        sites: target sites (module outputs compared against targets).
        anchor_templates: module templates of the anchor deltas (one per anchor site).
        sqrt_share: PMET's ``sqrt(n - i)`` share.

    Replay runs ONE batched no-grad forward pass of the (unedited) model over the
    bare prompts with every anchor delta added at ``l_1`` and reads every later
    edit layer's target sites; ``z^{l_1}`` is the anchor value itself.

    Source: METHOD.md "Forward replay", steps 1-2.
    """
    check_mode(mode)
    layers = list(hparams.layers)
    values: Dict[Tuple[int, str], torch.Tensor] = {}
    anchor_at = anchor_layer(mode, layers)
    for site in sites:
        values[(anchor_at, site.template)] = anchor.value[site.anchor_site]
    if mode == "replay" and len(layers) > 1:
        replayed = replay_forward(model, tok, requests, hparams, anchor, anchor_templates, layers[1:], sites)
        values.update(replayed)
    return Targets(mode, layers, list(sites), values, getattr(hparams, "replay_share", "remaining"), sqrt_share)


def replay_forward(
    model,
    tok,
    requests: Sequence[EditRequest],
    hparams,
    anchor: AnchorResult,
    anchor_templates: Sequence[str],
    read_layers: Sequence[int],
    sites: Sequence[TargetSite],
) -> Dict[Tuple[int, str], torch.Tensor]:
    """Run the model on the bare prompts with the anchor deltas added at
    ``anchor.layer`` and return ``{(layer, site.template): [R, d]}`` for ``read_layers``.

    The forward pass stops after the deepest module read.
    """
    probes = bare_probes(tok, requests, hparams.fact_token)
    add = {t.format(anchor.layer): anchor.delta[s] for s, t in enumerate(anchor_templates)}
    names = [(layer, site.template, site.template.format(layer)) for layer in read_layers for site in sites]
    reads = read_at_lookup(model, tok, probes, outputs=[n for _, _, n in names], add=add)
    return {(layer, tmp): reads["out:" + name] for layer, tmp, name in names}
