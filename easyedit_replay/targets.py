"""Target constructions: backward spreading, forward replay, the paper's baselines and
the shares beyond the paper (docs/method.md; Liu et al., ICML 2026, sections 4-5).

This module defines every construction (:data:`CONSTRUCTIONS`), builds the targets
(:func:`build_targets`, the replay forward pass) and sets the share of the residual
(:meth:`Targets.divisor`). Two other modules branch on a construction's fields:
:mod:`easyedit_replay.editor` (which layers get anchors and edits, and for
``replay_capacity`` / ``replay_joint`` the capacities and the joint plan) and
:mod:`easyedit_replay.joint` (the joint plan of ``replay_joint``). The update rules
(:mod:`easyedit_replay.algorithms`) never see the construction.

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

Beyond the paper, three shares of the replayed residual (docs/method.md, "Sharing the
replayed residual"):

replay_tau:
    replay's targets and anchor; layer ``l_i`` takes ``(z^{l_i} - h^{l_i}_cur) /
    (n - i + 1)^tau`` with ``tau = replay_tau`` in ``[0, 1]`` (PMET: ``sqrt(n - i + 1)^tau``);
    the last layer always takes its full remaining residual. ``tau = 0`` is replay
    (FE), ``tau = 1`` is ``replay_remaining``, ``tau = 0.5`` PMET's share on replayed
    targets. In a comparison, ``replay_tau=0.25`` sets the value per row.
replay_capacity:
    replay's targets and anchor; the share follows from what each layer can deliver.
    With ``q_l = k^T B_l^{-1} k`` the capacity of the update rule at layer ``l`` for a
    request's key (MEMIT/PMET: ``B = lambda C``; see ``Algorithm.capacity``), one
    key's solve realizes ``q/(1+q)`` of a requested change, at a regularizer cost of
    ``|d|^2 / q`` for a delivered change ``d``. Minimizing ``sum_j |d_j|^2 / q_j +
    |sum_j d_j - r|^2`` (the joint objective under the paper's additive assumption)
    gives ``d_j = q_j r / (1 + Q)``, ``Q = sum q_j``; asking layer ``l_i`` for
    ``(1 + q_i) / (1 + Q_i)`` of the replayed residual that remains (``Q_i`` summed
    over ``l_i..l_n``) realizes it layer by layer. The last layer's share is 1; with
    one layer able to deliver (every other ``q = 0``) it is FE.
replay_joint:
    replay's anchor; the same objective with the Jacobians ``J_j`` of the layers
    between the edits in place of the identity: ``d_j = q_j J_j^T mu``, ``(I + sum_j
    q_j J_j J_j^T) mu = r`` (:mod:`easyedit_replay.joint`). Layer ``l_j`` targets the
    planned state ``t_j`` (the unedited model with ``d_1..d_j`` added) and takes
    ``(1 + q_j) / q_j`` of its local residual; the last layer its full residual to
    ``z^{l_n}``.

With one edit layer every construction gives bit-identical targets and residuals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .anchors import AnchorResult
from .prompts import EditRequest
from .reads import bare_probes, read_at_lookup

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
            ``"full"``, ``"hparams"`` (``replay_share``: ``full`` or ``remaining``),
            ``"tau"`` (``(n - i)^replay_tau``), ``"capacity"`` (per request, from the
            update rule's capacity at each layer left) or ``"joint"`` (per request,
            ``(1 + q) / q`` of the residual to the jointly planned state).
        replay: later edit layers' targets come from one replay forward pass of
            the first anchor.
        summary: one line for help texts.
        param: the hyperparameter a mode spec ``"name=value"`` sets (``replay_tau``),
            empty if the construction takes none.
    """

    name: str
    anchors: Tuple[str, ...]
    edit: str
    measure: str
    share: str
    replay: bool
    summary: str
    param: str = ""

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
        return self.share in ("divide", "tau")


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
    Construction("replay_tau", (FIRST,), "all", "own", "tau", True,
                 "replayed targets, layer l_i takes 1/(layers left)^replay_tau of its residual (0: FE, 1: "
                 "replay_remaining)", param="replay_tau"),
    Construction("replay_capacity", (FIRST,), "all", "own", "capacity", True,
                 "replayed targets, each layer's share from what the layers left can deliver (q/(1+q))"),
    Construction("replay_joint", (FIRST,), "all", "own", "joint", True,
                 "replay's anchor, per-layer changes from one solve through the Jacobians between the edits"),
)}
MODES = tuple(CONSTRUCTIONS)  # the built-in constructions, in the paper's order
SHARES = ("divide", "full", "hparams", "tau", "capacity", "joint")


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
            or c.share not in SHARES:
        raise ValueError(f"Construction({c.name!r}): edit in all/ends/last, measure in own/last, "
                         f"share in {'/'.join(SHARES)}")
    if c.measure == "own" and not c.replay and c.edit == "all":
        raise ValueError(f"Construction({c.name!r}): edits every layer, measures each at itself, but has "
                         f"no replay to give the middle layers targets")
    if c.share == "joint" and (c.anchors != (FIRST,) or not c.replay or c.measure != "own" or c.edit != "all"):
        raise ValueError(f"Construction({c.name!r}): share 'joint' plans from replay's l_1 anchor and measures "
                         f"each edited layer at itself: use anchors=('first',), replay=True, measure='own', "
                         f"edit='all'")
    CONSTRUCTIONS[c.name] = c
    return c


def get_construction(mode) -> Construction:
    """The :class:`Construction` named ``mode`` (a Construction passes through).

    Raises:
        ValueError: an unknown name (the message lists the known ones), or a spec with
            sequential options (``"replay+rekeyed"``), which set hyperparameters that a
            construction alone does not carry.
    """
    if isinstance(mode, Construction):
        return mode
    if "+" in str(mode):
        raise ValueError(f"mode={mode!r}: '+{str(mode).split('+', 1)[1]}' sets hyperparameters; apply the spec "
                         f"with experiment.mode_hparams, or set the option's field in the hparams and pass "
                         f"mode={str(mode).split('+')[0]!r}")
    return parse_mode(mode)[0]


def parse_mode(spec) -> Tuple[Construction, Dict[str, object]]:
    """A mode spec of a comparison: ``"replay"``, ``"replay_tau=0.25"`` for a
    construction with a ``param`` (the value goes to that hyperparameter), each
    optionally followed by ``+option`` for registered sequential-editing options
    (``"replay+rekeyed"``, ``"replay_tau=0.25+norm_anchor"``;
    :data:`easyedit_replay.sequential.SEQUENTIAL_OPTIONS`).

    Returns:
        ``(construction, {hyperparameter: value})``: the ``param`` value and the
        options' fields (an empty dict for a bare name).

    Raises:
        ValueError: an unknown name or option, a value for a construction without a
            parameter, or a value that is not a number.
    """
    from .sequential import parse_options

    head, *options = str(spec).strip().split("+")
    name, eq, value = head.partition("=")
    try:
        c = CONSTRUCTIONS[name.strip()]
    except KeyError:
        raise ValueError(f"mode={spec!r}; use one of {list(CONSTRUCTIONS)}") from None
    try:
        params: Dict[str, object] = parse_options(options)
    except ValueError as exc:
        raise ValueError(f"mode={spec!r}: {exc}") from None
    if not eq:
        return c, params
    if not c.param:
        raise ValueError(f"mode={spec!r}: {c.name} takes no parameter; write {c.name!r}")
    try:
        return c, {c.param: float(value), **params}
    except ValueError:
        raise ValueError(f"mode={spec!r}: {value!r} is not a number (e.g. {c.name}=0.5)") from None


def mode_spec(spec) -> str:
    """The canonical spelling of a mode spec (``" replay_tau=0.250"`` -> ``"replay_tau=0.25"``,
    ``"replay + rekeyed"`` -> ``"replay+rekeyed"``).

    Raises:
        ValueError: as :func:`parse_mode`.
    """
    c, params = parse_mode(spec)
    options = [o.strip() for o in str(spec).split("+")[1:]]
    value = f"={params[c.param]:g}" if c.param and c.param in params else ""
    return c.name + value + "".join(f"+{o}" for o in options)


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
    tau: Optional[float] = None
    capacity: Optional[Dict[Tuple[int, str], torch.Tensor]] = None
    info: Dict[str, float] = field(default_factory=dict)

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

    def divisor(self, step: int, site: Optional[TargetSite] = None):
        """Share of the local residual taken at ``step``, as a divisor: ``n - step`` (or its
        sqrt) edited layers left when dividing, raised to ``tau`` for ``replay_tau``, else 1
        (a float); for ``replay_capacity`` a ``[R]`` float32 tensor, one divisor per request,
        ``(1 + Q_i) / (1 + q_i)`` (``q`` from :attr:`capacity` at ``site``; module
        docstring). This is the only place the share is set.

        Raises:
            ValueError: ``replay_capacity`` without capacities or without ``site``.
        """
        if self.construction.share == "capacity":
            return self._capacity_divisor(step, site)
        if self.construction.share == "joint":
            return self._joint_divisor(step, site)
        if not self.divide:
            return 1.0
        remaining = len(self.edit_layers) - step
        base = math.sqrt(remaining) if self.sqrt_share else float(remaining)
        return base if self.tau is None else base ** self.tau

    def _capacity_divisor(self, step: int, site: Optional[TargetSite]) -> torch.Tensor:
        if self.capacity is None or site is None:
            raise ValueError("replay_capacity needs Targets.capacity (set by compute_edit) and the site")
        q = torch.stack([self.capacity[(layer, site.template)].double() for layer in self.edit_layers[step:]])
        q_all, q_here = q.sum(dim=0), q[0]
        # an infinite capacity (EMMET with emmet_lambda = 0) delivers exactly: it takes all that is left
        share = torch.where(torch.isinf(q_here), torch.ones_like(q_here), (1 + q_here) / (1 + q_all))
        share = torch.where(torch.isinf(q_all) & ~torch.isinf(q_here), torch.zeros_like(share), share)
        return (1 / share).float()

    def _joint_divisor(self, step: int, site: Optional[TargetSite]):
        if step == len(self.edit_layers) - 1:
            return 1.0
        if self.capacity is None or site is None:
            raise ValueError("replay_joint needs Targets.capacity (set by compute_edit) and the site")
        q = self.capacity[(self.edit_layers[step], site.template)].double()
        # ask for (1 + q) / q of the planned change so that the solve realizes it; q = 0: nothing
        share = torch.where(q > 0, (1 + q) / q.clamp_min(1e-300), torch.zeros_like(q))
        return (1 / share).float()

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
    c = get_construction(mode)
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
    tau = float(getattr(hparams, "replay_tau", 0.5)) if c.share == "tau" else None
    return Targets(c, layers, c.edit_layers(layers), list(sites), values, c.divides(hparams), sqrt_share, tau)


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
