"""Target construction: the one place where backward spreading, forward replay and
the paper's baselines differ (METHOD.md; Liu et al., ICML 2026, sections 4-5).

Edit layers ``R = [l_1 < ... < l_n]`` (``hparams.layers``). A target construction
(:class:`Construction`, the "mode") says

- where anchors are optimized (the first and/or the last edit layer),
- which layers are edited (all, the first and last, or only the last),
- where the current state of each edited layer is measured (at ``l_n``, as the
  stock methods do, or at the edited layer itself),
- which share of the local residual each layer takes (divided by the number of
  edited layers left, or the full residual),
- whether later targets come from a replay of the first anchor.

The constructions (:data:`CONSTRUCTIONS`):

spread (MEMIT, PMET, EMMET, AlphaEdit as shipped):
    anchor at ``l_n``: ``z = h^{l_n} + delta``. At step ``i`` (0-based) the current
    state is measured at ``l_n`` with the layers before ``l_{i+1}`` already edited
    and the residual is ``(z - h^{l_n}_cur) / (n - i)`` (PMET: ``sqrt(n - i)``).
replay (``*_REPLAY``, the paper's FE):
    anchor at ``l_1``; one batched no-grad forward pass of the unedited model on the
    bare prompts, with the anchor deltas added at ``l_1`` at the lookup token,
    records ``z^{l_i}`` at every later edit layer. The current state is measured at
    ``l_i`` itself and the residual is the full ``z^{l_i} - h^{l_i}_cur``
    (``replay_share: full``, the default) or ``(z^{l_i} - h^{l_i}_cur) / (n - i)``
    (PMET ``sqrt``; ``replay_share: remaining``, an ablation).
replay_remaining:
    replay with ``replay_share: remaining`` whatever the hparams say (the ablation
    as its own row of a comparison).
blue (Li et al., 2025):
    two anchors optimized independently with the stock objective, at ``l_1`` and at
    ``l_n`` (exactly replay's and spreading's anchors); only ``l_1`` and ``l_n`` are
    edited, each with its full local residual measured at the layer itself.
onelayer:
    only ``l_n`` is edited, with the stock anchor at ``l_n`` (spreading with
    ``layers = [l_n]``).
nodiv:
    spreading without dividing: anchor at ``l_n``, state measured at ``l_n``, every
    layer takes the full residual (the paper's Table 2, "No-dividing").

With one edit layer every construction gives bit-identical targets and residuals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from .anchor import AnchorResult
from .keys import EditRequest, bare_probes, read_at_lookup

FIRST, LAST = "first", "last"


@dataclass(frozen=True)
class Construction:
    """A target construction ("mode"); see the module docstring.

    Attributes:
        name: lower-case name (``alg_name`` suffix in upper case: ``MEMIT_BLUE``).
        anchors: where anchors are optimized: ``("last",)``, ``("first",)`` or both.
        edit: ``"all"`` edit layers, ``"ends"`` (first and last) or ``"last"``.
        measure: ``"last"`` (current state read at ``l_n``) or ``"own"`` (at the
            edited layer itself).
        share: ``"divide"`` (``n - i`` edited layers left, PMET ``sqrt``),
            ``"full"``, or ``"hparams"`` (``replay_share``: ``full`` or ``remaining``).
        replay: later edit layers' targets come from one replay forward pass of
            the first anchor.
        summary: one line for help texts.
    """

    name: str
    anchors: Tuple[str, ...]
    edit: str
    measure: str
    share: str
    replay: bool
    summary: str

    @property
    def suffix(self) -> str:
        return self.name.upper()

    def edit_layers(self, layers: Sequence[int]) -> List[int]:
        """The layers this construction writes, in edit order."""
        layers = list(layers)
        if self.edit == "last":
            return layers[-1:]
        if self.edit == "ends":
            return sorted(set([layers[0], layers[-1]]))
        return layers

    def anchor_layers(self, layers: Sequence[int]) -> List[int]:
        """The layers whose hidden state is optimized (``[l_n]``, ``[l_1]`` or ``[l_1, l_n]``)."""
        out = [layers[0] if a == FIRST else layers[-1] for a in self.anchors]
        return list(dict.fromkeys(out))

    def divides(self, hparams) -> bool:
        """Whether the residual is divided by the number of edited layers left."""
        if self.share == "hparams":
            return getattr(hparams, "replay_share", "full") == "remaining"
        return self.share == "divide"


CONSTRUCTIONS: Dict[str, Construction] = {c.name: c for c in (
    Construction("spread", (LAST,), "all", "last", "divide", False,
                 "stock backward spreading: anchor at l_n, residual divided over the layers left"),
    Construction("replay", (FIRST,), "all", "own", "hparams", True,
                 "forward replay (the paper's FE): anchor at l_1, replayed targets, full local residual"),
    Construction("replay_remaining", (FIRST,), "all", "own", "divide", True,
                 "ablation: replayed targets with the stock share (residual divided over the layers left)"),
    Construction("blue", (FIRST, LAST), "ends", "own", "full", False,
                 "BLUE: independent anchors at l_1 and l_n, only those two layers edited, full residuals"),
    Construction("onelayer", (LAST,), "last", "own", "full", False,
                 "OneLayer: only l_n edited, stock anchor"),
    Construction("nodiv", (LAST,), "all", "last", "full", False,
                 "spreading without dividing: every layer takes the full residual to the l_n anchor"),
)}
MODES = tuple(CONSTRUCTIONS)  # the built-in constructions, in the paper's order


def register_construction(construction: Construction) -> Construction:
    """Add a target construction; every registered algorithm then has the
    ``alg_name`` ``f"{ALG}_{construction.suffix}"`` and its entry point.

    Raises:
        ValueError: a field outside its allowed values.
    """
    c = construction
    if not c.anchors or any(a not in (FIRST, LAST) for a in c.anchors):
        raise ValueError(f"Construction({c.name!r}).anchors must name 'first' and/or 'last'")
    if c.edit not in ("all", "ends", "last") or c.measure not in ("own", "last") \
            or c.share not in ("divide", "full", "hparams"):
        raise ValueError(f"Construction({c.name!r}): edit in all/ends/last, measure in own/last, "
                         f"share in divide/full/hparams")
    if c.measure == "own" and not c.replay and c.edit == "all":
        raise ValueError(f"Construction({c.name!r}): edits every layer, measures each at itself, but has "
                         f"no replay to give the middle layers targets")
    CONSTRUCTIONS[c.name] = c
    return c


def get_construction(mode) -> Construction:
    """The :class:`Construction` named ``mode`` (a Construction passes through).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if isinstance(mode, Construction):
        return mode
    try:
        return CONSTRUCTIONS[str(mode)]
    except KeyError:
        raise ValueError(f"mode={mode!r}; use one of {list(CONSTRUCTIONS)}") from None


def anchor_layer(mode, layers: Sequence[int]) -> int:
    """The (single) anchor layer of a one-anchor construction: ``l_n`` for spreading,
    ``l_1`` for replay. Raises ValueError for two-anchor constructions (BLUE)."""
    found = get_construction(mode).anchor_layers(layers)
    if len(found) != 1:
        raise ValueError(f"mode {mode!r} optimizes anchors at {found}; use Construction.anchor_layers")
    return found[0]


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
    and ``l_n``). ``edit_layers`` are the layers written, in order.
    """

    construction: Construction
    layers: List[int]
    edit_layers: List[int]
    sites: List[TargetSite]
    values: Dict[Tuple[int, str], torch.Tensor]
    divide: bool
    sqrt_share: bool = False

    @property
    def mode(self) -> str:
        return self.construction.name

    def measure_layer(self, step: int) -> int:
        """Layer at which the current state is measured at ``step`` (0-based over
        :attr:`edit_layers`)."""
        return self.layers[-1] if self.construction.measure == "last" else self.edit_layers[step]

    def target(self, step: int, site: TargetSite) -> torch.Tensor:
        """``[R, d]`` target compared with the state measured at :meth:`measure_layer`."""
        return self.values[(self.measure_layer(step), site.template)]

    def divisor(self, step: int) -> float:
        """Share of the local residual taken at ``step``: ``n - step`` (or its sqrt) edited
        layers left when dividing, else 1. This is the only place the share is set."""
        if not self.divide:
            return 1.0
        remaining = len(self.edit_layers) - step
        return math.sqrt(remaining) if self.sqrt_share else float(remaining)

    def local_error(self, step: int, site: TargetSite, current: torch.Tensor) -> torch.Tensor:
        """``[R, d]`` ``target - current`` (before the share), in the model dtype or float32
        if that is wider (fp16/bf16 models).

        ``current`` is ``[R, d]``, measured at :meth:`measure_layer` with the layers
        before ``edit_layers[step]`` already edited.
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
    anchors: Mapping[int, AnchorResult],
    mode,
    sites: Sequence[TargetSite],
    anchor_templates: Sequence[str],
    sqrt_share: bool = False,
) -> Targets:
    """Targets for every edited layer and site.

    Args:
        anchors: ``{layer: AnchorResult}`` for every layer of
            ``Construction.anchor_layers`` (or one AnchorResult for a one-anchor construction) (``anchor.sites`` are ``anchor_templates``
            formatted with that layer).
        sites: target sites (module outputs compared against targets).
        anchor_templates: module templates of the anchor deltas (one per anchor site).
        sqrt_share: PMET's ``sqrt(n - i)`` share.

    Replay runs ONE batched no-grad forward pass of the (unedited) model over the
    bare prompts with every anchor delta added at ``l_1`` and reads every later
    edit layer's target sites; ``z^{l_1}`` is the anchor value itself.

    Raises:
        ValueError: an anchor layer of the construction is missing from ``anchors``.

    Source: METHOD.md "Forward replay", steps 1-2; "The paper's baselines".
    """
    c = get_construction(mode)
    if isinstance(anchors, AnchorResult):
        anchors = {anchors.layer: anchors}
    layers = list(hparams.layers)
    values: Dict[Tuple[int, str], torch.Tensor] = {}
    for layer in c.anchor_layers(layers):
        if layer not in anchors:
            raise ValueError(f"mode {c.name!r} needs an anchor at layer {layer}; got layers {sorted(anchors)}")
        for site in sites:
            values[(layer, site.template)] = anchors[layer].value[site.anchor_site]
    if c.replay and len(layers) > 1:
        values.update(replay_forward(model, tok, requests, hparams, anchors[layers[0]], anchor_templates,
                                     layers[1:], sites))
    return Targets(c, layers, c.edit_layers(layers), list(sites), values, c.divides(hparams), sqrt_share)


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
