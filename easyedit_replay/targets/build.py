"""The targets of one edit: the anchors' values, the replay forward pass, and the final
target (docs/method.md, "Forward replay" steps 1-2 and "The constructions").

:func:`build_targets` gives every edited layer's target sites their target state
(:class:`Targets`); the construction's share (:mod:`easyedit_replay.targets.shares`)
gives each layer's share of the residual (:meth:`Targets.divisor`).
:func:`final_hidden_target` is the state at ``l_n`` a construction's final target
implies (the paper's section-4 analyses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..anchors import AnchorResult
from ..prompts import EditRequest
from ..reads import bare_probes, read_at_lookup
from .construction import Construction, get_construction


@dataclass(frozen=True)
class TargetSite:
    """Where a target lives: ``template`` names the module whose OUTPUT is the target
    (e.g. ``model.layers.{}`` for MEMIT, ``model.layers.{}.mlp.down_proj`` for PMET),
    and ``anchor_site`` indexes the anchor delta that moves it."""

    template: str
    anchor_site: int = 0


@dataclass
class Targets:
    """Per-layer targets of one batch of ``R`` requests.

    ``values[(layer, site.template)]`` is ``[R, d]``: the state that ``layer``'s
    site should reach (spread: only ``l_n``; replay: every edit layer; BLUE: ``l_1``
    and ``l_n``). ``edit_layers`` are the layers written, in order. The construction's
    share may complete them before the first write
    (:meth:`~easyedit_replay.targets.shares.Share.prepare`): ``capacity[(layer,
    site.template)]`` is ``[R]``, the rule's capacity (``replay_capacity``,
    ``replay_joint``), and ``info`` the share's cost (``replay_joint``'s solve).
    """

    construction: Construction
    layers: List[int]
    edit_layers: List[int]
    sites: List[TargetSite]
    values: Dict[Tuple[int, str], torch.Tensor]
    sqrt_share: bool = False
    capacity: Optional[Dict[Tuple[int, str], torch.Tensor]] = None
    info: Dict[str, float] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        """The construction's name (``"spread"``, ``"replay"``, ``"blue"``, ...)."""
        return self.construction.name

    def measure_layer(self, step: int) -> int:
        """Layer at which the current state is measured at ``step`` (0-based over
        :attr:`edit_layers`)."""
        return self.layers[-1] if self.construction.measure == "last" else self.edit_layers[step]

    def target(self, step: int, site: TargetSite) -> torch.Tensor:
        """``[R, d]`` target compared with the state measured at :meth:`measure_layer`."""
        return self.values[(self.measure_layer(step), site.template)]

    def divisor(self, step: int, site: Optional[TargetSite] = None):
        """Share of the local residual taken at ``step``, as a divisor: a float, or for a
        per-request share (``replay_capacity``, ``replay_joint``) a ``[R]`` float32 tensor,
        one per request. The construction's share sets it
        (:meth:`easyedit_replay.targets.shares.Share.divisor`).

        Raises:
            ValueError: a per-request share without :attr:`capacity` or without ``site``.
        """
        return self.construction.share.divisor(self, step, site)

    def local_error(self, step: int, site: TargetSite, current: torch.Tensor) -> torch.Tensor:
        """``[R, d]`` ``target - current`` (before the share), in the model dtype or float32
        if that is wider (fp16/bf16 models).

        ``current`` is ``[R, d]``, measured at :meth:`measure_layer` with the layers
        before ``edit_layers[step]`` already edited.
        """
        z = self.target(step, site)
        dtype = torch.promote_types(z.dtype, torch.float32)  # half-precision models: subtract in float32
        return z.to(dtype) - current.to(device=z.device, dtype=dtype)

    def share_of(self, step: int, site: TargetSite, error: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """``[R, d]`` ``error / divisor`` in ``dtype``, for a local error already computed
        (:meth:`local_error`); a per-request divisor divides each row."""
        divisor = self.divisor(step, site)
        if torch.is_tensor(divisor):
            divisor = divisor.to(device=error.device)[:, None]
        return error.to(dtype) / divisor


def build_targets(
    model,
    tok,
    requests: Sequence[EditRequest],
    hparams,
    anchors: Mapping[int, AnchorResult],
    mode,
    sites: Sequence[TargetSite],
    anchor_templates: Sequence[str],
    sqrt_share: bool = False,
) -> Targets:
    """Targets for every edited layer and site.

    Args:
        mode: the :class:`Construction` (or its name or spec); the parameters it leaves
            open are read from their YAML keys in ``hparams`` (:meth:`Construction.configured`).
        anchors: ``{layer: AnchorResult}`` for every layer of
            ``Construction.anchor_layers`` (or one AnchorResult for a one-anchor construction) (``anchor.sites`` are ``anchor_templates``
            formatted with that layer).
        sites: target sites (module outputs compared against targets).
        anchor_templates: module templates of the anchor deltas (one per anchor site).
        sqrt_share: PMET's ``sqrt(n - i)`` share.

    Replay runs ONE batched no-grad forward pass of the (unedited) model over the
    bare prompts with every anchor delta added at ``l_1`` and reads every later
    edit layer's target sites; ``z^{l_1}`` is the anchor value itself when the anchor
    delta sits on the target site, else (a post-norm block, whose anchor sits on the
    rewritten module's output: :mod:`easyedit_replay.postnorm`) the site's output read
    in a forward pass with the delta added.

    Raises:
        ValueError: an anchor layer of the construction is missing from ``anchors``.

    Source: docs/method.md, "Forward replay" steps 1-2 and "The constructions".
    """
    c = get_construction(mode).configured(hparams)
    if isinstance(anchors, AnchorResult):
        anchors = {anchors.layer: anchors}
    layers = list(hparams.layers)
    values: Dict[Tuple[int, str], torch.Tensor] = {}
    for layer in c.anchor_layers(layers):
        if layer not in anchors:
            raise ValueError(f"mode {c.name!r} needs an anchor at layer {layer}; got layers {sorted(anchors)}")
        for site in sites:
            if anchors[layer].sites[site.anchor_site] == site.template.format(layer):
                values[(layer, site.template)] = anchors[layer].value[site.anchor_site]
            else:  # the delta sits inside the block (a post-norm MLP's rewrite output): read the target
                values.update(replay_forward(model, tok, requests, hparams, anchors[layer], anchor_templates,
                                             [layer], [site]))
    if c.replay and len(layers) > 1:
        values.update(replay_forward(model, tok, requests, hparams, anchors[layers[0]], anchor_templates,
                                     layers[1:], sites))
    return Targets(c, layers, c.edit_layers(layers), list(sites), values, sqrt_share)


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


def final_hidden_target(model, tok, requests: Sequence[EditRequest], hparams, anchors: Mapping[int, AnchorResult],
                        mode, anchor_templates: Sequence[str]) -> torch.Tensor:
    """``[R, d]`` ``m_L``: the residual-stream state at the output of block ``l_n`` that
    the construction's final target implies (the paper's Tables 2 and 5).

    Spreading, no-dividing, OneLayer and BLUE: the unedited model's state with the
    ``l_n`` anchor deltas added (MEMIT: the anchor ``z`` itself); replay: the state
    replayed from the ``l_1`` anchor (``z^{l_n}``). PMET's anchors sit on module
    outputs, so in every case this is one no-grad forward pass with the deltas
    added, read at ``layer_module_tmp.format(l_n)``.
    """
    c = get_construction(mode)
    layers = list(hparams.layers)
    anchor = anchors[layers[0]] if c.replay else anchors[layers[-1]]
    site = TargetSite(hparams.layer_module_tmp, 0)
    return replay_forward(model, tok, requests, hparams, anchor, anchor_templates, [layers[-1]], [site])[
        (layers[-1], site.template)]
