"""How each edited layer shares its local residual: one strategy class per way.

A construction's ``share`` is one :class:`Share`. :func:`easyedit_replay.editor.compute_edit`
calls it twice and never branches on it:

- :meth:`Share.prepare` once per edit, after the targets are built and before the
  first layer is written (:class:`ShareContext`: the model, the rule, its statistics,
  the key probes and the targets). ``Capacity`` and ``Joint`` compute the rule's
  capacities there (:attr:`Targets.capacity`); ``Joint`` also plans the changes and
  rewrites the targets of ``l_1..l_{n-1}`` (:attr:`Targets.values`, cost in
  :attr:`Targets.info`).
- :meth:`Share.divisor` for each edited layer and site: the share of the local
  residual ``target - current`` as a divisor (a float, or ``[R]``, one per request),
  handed to the update rule with the residual (:meth:`Targets.divisor`).

A strategy is a frozen dataclass whose fields are the construction's parameters
(:class:`Tau`'s ``tau``). A parameter left open is read from its YAML key when the
edit starts (:meth:`Share.configured`): ``replay_tau``, and ``replay_share: remaining``,
which makes replay's :class:`Full` share a :class:`Divide`. The ways (``n`` edit
layers, step ``i`` 0-based; docs/method.md, "The constructions" and "Sharing the
replayed residual"):

- :class:`Divide`: ``n - i`` (PMET ``sqrt(n - i)``), the stock spreading share;
- :class:`Full`: 1, the full residual (replay, the paper's FE);
- :class:`Tau`: ``(n - i)^tau`` (PMET ``sqrt(n - i)^tau``);
- :class:`Capacity`: ``(1 + Q_i) / (1 + q_i)`` per request from the rule's capacity;
- :class:`Joint`: ``q_i / (1 + q_i)`` per request toward the jointly planned state
  (:mod:`easyedit_replay.targets.joint`), 1 at the last layer.

A new way of sharing is one subclass (``divisor``, and ``prepare`` if it needs the model)
in a construction passed to :func:`~easyedit_replay.targets.register_construction`
(tests/helpers/toy_extensions.py adds one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch

from ..errors import HyperParamsError, NumericalError, check_finite, field_error
from ..reads import average_over_templates, read_at_lookup
from . import joint


@dataclass
class ShareContext:
    """What a share reads when it prepares one edit (:meth:`Share.prepare`), built by
    :func:`~easyedit_replay.editor.compute_edit` on the unedited model.

    Attributes:
        rule: the update rule (:class:`~easyedit_replay.algorithms.base.Algorithm`);
            ``sites`` its sites for ``hparams``.
        requests: the prepared requests (``R``); ``templates`` the context templates.
        covs: ``{rewritten module: [d_in, d_in]}`` second moments; ``state`` the rule's
            prepared state.
        key_probes: each request in each context template (the keys' probes).
        targets: the edit's :class:`~easyedit_replay.targets.build.Targets`, which
            ``prepare`` may complete (``capacity``, ``values``, ``info``).
    """

    model: Any
    tok: Any
    hparams: Any
    rule: Any
    sites: list
    requests: list
    templates: List[List[str]]
    covs: Dict[str, torch.Tensor]
    state: Any
    key_probes: list
    targets: Any


@dataclass(frozen=True)
class Share:
    """One way of sharing the local residual (module docstring). Subclasses set
    ``name`` and implement :meth:`divisor`; the other methods default to a share that
    needs nothing.

    Class attributes:
        name: the share's name in :data:`SHARES` and in messages.
        param: the hyperparameter a mode spec ``"name=value"`` sets, empty if none.
        per_request: the divisor differs per request (capacities), so that only this
            batch's requests can take it (``sequential_refresh`` refuses it).
    """

    name: ClassVar[str] = ""
    param: ClassVar[str] = ""
    per_request: ClassVar[bool] = False

    def configured(self, hparams) -> "Share":
        """This share with the parameters it leaves open read from their YAML keys."""
        return self

    def with_param(self, value) -> "Share":
        """This share with its parameter set to ``value``.

        Raises:
            ValueError: the share takes no parameter.
        """
        raise ValueError(f"the {self.name} share takes no parameter")

    def check(self, construction) -> None:
        """Raise ValueError when ``construction``'s other fields cannot serve this share
        (at :func:`~easyedit_replay.targets.register_construction`)."""

    def refusal(self, rule, hparams) -> Optional[str]:
        """Why ``rule`` with ``hparams`` cannot take this share, or None."""
        return None

    def prepare(self, ctx: ShareContext) -> None:
        """Complete ``ctx.targets`` for this share before the first layer is written."""

    def divisor(self, targets, step: int, site=None):
        """The share of the local residual at ``step`` (0-based over ``targets.edit_layers``)
        and ``site`` (a :class:`~easyedit_replay.targets.build.TargetSite`), as a divisor:
        a float, or a ``[R]`` float32 tensor, one per request."""
        raise NotImplementedError


def layers_left(targets, step: int) -> float:
    """``n - step`` edited layers left (``sqrt`` of it for PMET's ``targets.sqrt_share``)."""
    remaining = len(targets.edit_layers) - step
    return math.sqrt(remaining) if targets.sqrt_share else float(remaining)


@dataclass(frozen=True)
class Divide(Share):
    """The residual divided over the edited layers left: ``n - i`` (PMET ``sqrt(n - i)``),
    the stock spreading share (spread, replay_remaining)."""

    name: ClassVar[str] = "divide"

    def divisor(self, targets, step: int, site=None) -> float:
        """``n - step`` (``sqrt(n - step)`` for PMET): EasyEdit's stock share
        (``execute_memit``'s ``resid / (len(layers) - i)``)."""
        return layers_left(targets, step)


@dataclass(frozen=True)
class Full(Share):
    """Every edited layer takes its full local residual (divisor 1): replay (FE), BLUE,
    OneLayer, no-dividing.

    Attributes:
        alias: a YAML key whose value ``"remaining"`` asks for :class:`Divide` instead
            (replay's ``replay_share``, the ablation); empty: none.
    """

    name: ClassVar[str] = "full"
    alias: str = ""

    def configured(self, hparams) -> Share:
        """:class:`Divide` when ``hparams.<alias>`` is ``"remaining"``, else ``Full()``
        (a missing field counts as ``"full"``)."""
        if self.alias and getattr(hparams, self.alias, "full") == "remaining":
            return Divide()
        return Full()

    def divisor(self, targets, step: int, site=None) -> float:
        """Always 1.0: the full local residual at every step."""
        return 1.0


@dataclass(frozen=True)
class Tau(Share):
    """``(n - i)^tau`` (PMET ``sqrt(n - i)^tau``): 0 is :class:`Full`, 1 is :class:`Divide`
    (bit-identical), the last layer always takes its full remaining residual.

    Attributes:
        tau: the exponent in ``[0, 1]``; None: the YAML's ``replay_tau`` (default 0.5).

    Raises:
        HyperParamsError: ``tau`` outside ``[0, 1]``.
    """

    name: ClassVar[str] = "tau"
    param: ClassVar[str] = "replay_tau"
    tau: Optional[float] = None

    def __post_init__(self) -> None:
        if self.tau is not None and not 0 <= self.tau <= 1:
            raise field_error(HyperParamsError, self.param, self.tau,
                              "must be a number in [0, 1] (0: full residual as FE, 1: divided as spreading)")

    def configured(self, hparams) -> Share:
        """This share when ``tau`` is set, else ``Tau(hparams.replay_tau)`` (0.5 when the
        field is missing).

        Raises:
            HyperParamsError: ``hparams.replay_tau`` outside ``[0, 1]``.
        """
        return self if self.tau is not None else Tau(float(getattr(hparams, self.param, 0.5)))

    def with_param(self, value) -> Share:
        """``Tau(float(value))``.

        Raises:
            HyperParamsError: ``value`` outside ``[0, 1]``.
            ValueError / TypeError: ``value`` not convertible by ``float``.
        """
        return Tau(float(value))

    def divisor(self, targets, step: int, site=None) -> float:
        """``layers_left(targets, step) ** tau``: ``(n - step)^tau``, PMET
        ``sqrt(n - step)^tau`` (ours: interpolates the paper's FE, tau 0, and stock
        spreading, tau 1).

        Raises:
            ValueError: ``tau`` is None (the construction was not configured).
        """
        if self.tau is None:
            raise ValueError("Tau(tau=None): configure the construction with the hparams first")
        return layers_left(targets, step) ** self.tau


def capacities(ctx: ShareContext) -> Dict[Tuple[int, str], torch.Tensor]:
    """``{(layer, target template): [R] q}``: the rule's capacity (``Algorithm.capacity``)
    at every edited layer and site, from the unedited model's keys (one forward pass
    over ``ctx.key_probes``). An infinite ``q`` (EMMET with ``emmet_lambda = 0``)
    delivers exactly.

    Raises:
        NumericalError: a capacity that is NaN."""
    rewrites = {(layer, s.target.template): s.rewrite_template.format(layer) for layer in ctx.targets.edit_layers
                for s in ctx.sites}
    reads = read_at_lookup(ctx.model, ctx.tok, ctx.key_probes, inputs=list(dict.fromkeys(rewrites.values())))
    out = {}
    for key, rewrite in rewrites.items():
        keys = average_over_templates(reads["in:" + rewrite], ctx.templates)  # [R, d_in]
        out[key] = ctx.rule.capacity(keys.T, ctx.covs[rewrite], ctx.hparams, ctx.state, f"{rewrite}.weight").cpu()
        check_finite(out[key].masked_fill(out[key] == float("inf"), 0), f"capacity at {rewrite}")  # inf: exact
    return out


@dataclass(frozen=True)
class Capacity(Share):
    """Each layer's share from what the layers left can deliver: layer ``l_i`` is asked
    for ``(1 + q_i) / (1 + Q_i)`` of its residual (``Q_i = q_i + ... + q_n``), per request;
    the last layer's share is 1 (replay_capacity)."""

    name: ClassVar[str] = "capacity"
    per_request: ClassVar[bool] = True

    def prepare(self, ctx: ShareContext) -> None:
        """Set ``ctx.targets.capacity`` to :func:`capacities` (``{(layer, template): [R]}``).

        Raises:
            NumericalError: a capacity that is NaN (from :func:`capacities`).
        """
        ctx.targets.capacity = capacities(ctx)

    def divisor(self, targets, step: int, site=None) -> torch.Tensor:
        """``[R]`` float32 ``(1 + Q_i) / (1 + q_i)``.

        Raises:
            ValueError: no capacities (``prepare`` not run) or no ``site``."""
        if targets.capacity is None or site is None:
            raise ValueError("replay_capacity needs Targets.capacity (set by compute_edit) and the site")
        q = torch.stack([targets.capacity[(layer, site.template)].double() for layer in targets.edit_layers[step:]])
        q_all, q_here = q.sum(dim=0), q[0]
        # an infinite capacity (EMMET with emmet_lambda = 0) delivers exactly: it takes all that is left
        share = torch.where(torch.isinf(q_here), torch.ones_like(q_here), (1 + q_here) / (1 + q_all))
        share = torch.where(torch.isinf(q_all) & ~torch.isinf(q_here), torch.zeros_like(share), share)
        return (1 / share).float()


@dataclass(frozen=True)
class Joint(Capacity):
    """Per-layer changes from one solve through the Jacobians between the edits
    (:mod:`easyedit_replay.targets.joint`): layer ``l_j`` (``j < n``) targets the planned
    state and is asked for ``(1 + q_j) / q_j`` of its residual, the last layer for its
    full residual to ``z^{l_n}`` (replay_joint). Plans from replay's ``l_1`` anchor, so
    it needs a replay construction that edits every layer measured at itself, and one
    block-output site per layer."""

    name: ClassVar[str] = "joint"

    def check(self, construction) -> None:
        """Accept only a construction that plans from replay's ``l_1`` anchor.

        Raises:
            ValueError: ``construction`` is not ``anchors=("first",)``, ``replay=True``,
                ``measure="own"``, ``edit="all"``.
        """
        c = construction
        if c.anchors != ("first",) or not c.replay or c.measure != "own" or c.edit != "all":
            raise ValueError(f"Construction({c.name!r}): share 'joint' plans from replay's l_1 anchor and measures "
                             f"each edited layer at itself: use anchors=('first',), replay=True, measure='own', "
                             f"edit='all'")

    def refusal(self, rule, hparams) -> Optional[str]:
        """A message when ``rule`` edits anything but one site per layer whose target is
        the block output (``layer_module_tmp``): PMET's two module-output sites; else None."""
        sites = rule.sites(hparams)
        if len(sites) != 1 or sites[0].target.template != hparams.layer_module_tmp:
            return (f"replay_joint plans changes of the block output (layer_module_tmp); this rule edits "
                    f"{len(sites)} other site(s) per layer. Use replay_capacity, which shares per site")
        return None

    def prepare(self, ctx: ShareContext) -> None:
        """The capacities, then (with two edit layers or more) the joint plan: the
        targets of ``l_1..l_{n-1}`` become the planned states, the plan's cost goes to
        ``targets.info``.

        Raises:
            HyperParamsError: an infinite capacity (EMMET with ``emmet_lambda = 0``; from
                :func:`~easyedit_replay.targets.joint.joint_plan`).
            NumericalError: the solve broke down or a planned state is not finite."""
        super().prepare(ctx)
        targets, hparams = ctx.targets, ctx.hparams
        template, layers = hparams.layer_module_tmp, targets.edit_layers
        if len(layers) < 2:
            return
        plan = joint.joint_plan(ctx.model, ctx.tok, ctx.requests, hparams, targets.values[(layers[-1], template)],
                                {l: targets.capacity[(l, template)] for l in layers}, layers, template)
        if not plan.relative_residual < 1:  # NaN or a diverged solve
            raise NumericalError(f"replay_joint: the joint solve did not converge (relative residual "
                                 f"{plan.relative_residual}); no weight was changed")
        for layer, state in plan.trajectory.items():
            check_finite(state, f"replay_joint planned state at layer {layer}")
            targets.values[(layer, template)] = state
        targets.info.update({"joint_" + k: v for k, v in plan.info().items()})

    def divisor(self, targets, step: int, site=None):
        """``[R]`` float32 ``q / (1 + q)`` (0 where ``q = 0``: nothing asked), 1.0 at the last layer.

        Raises:
            ValueError: no capacities (``prepare`` not run) or no ``site``."""
        if step == len(targets.edit_layers) - 1:
            return 1.0
        if targets.capacity is None or site is None:
            raise ValueError("replay_joint needs Targets.capacity (set by compute_edit) and the site")
        q = targets.capacity[(targets.edit_layers[step], site.template)].double()
        # ask for (1 + q) / q of the planned change so that the solve realizes it; q = 0: nothing
        share = torch.where(q > 0, (1 + q) / q.clamp_min(1e-300), torch.zeros_like(q))
        return (1 / share).float()


SHARES: Dict[str, type] = {s.name: s for s in (Divide, Full, Tau, Capacity, Joint)}  # the built-in ways, by name

__all__ = ["SHARES", "Capacity", "Divide", "Full", "Joint", "Share", "ShareContext", "Tau", "capacities",
           "layers_left"]
