"""The :class:`Construction` value, its registry and mode specs.

A construction is registered once (:data:`CONSTRUCTIONS`, :func:`register_construction`);
every algorithm then has the ``alg_name`` ``f"{ALG}_{construction.suffix}"``. A mode
spec (``compare --modes``: ``"replay"``, ``"replay_tau=0.25"``, ``"replay+rekeyed"``)
names a construction and sets its parameter (:func:`parse_mode`). The constructions
themselves are described in :mod:`easyedit_replay.targets`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .shares import SHARES, Capacity, Divide, Full, Joint, Share, Tau

FIRST, LAST = "first", "last"


@dataclass(frozen=True)
class Construction:
    """A target construction ("mode"); see :mod:`easyedit_replay.targets`.

    Attributes:
        name: lower-case name (``alg_name`` suffix in upper case: ``MEMIT_BLUE``).
        anchors: where anchors are optimized: ``("last",)``, ``("first",)`` or both.
        edit: ``"all"`` edit layers, ``"ends"`` (first and last) or ``"last"``.
        measure: ``"last"`` (current state read at ``l_n``) or ``"own"`` (at the
            edited layer itself).
        share: how each edited layer shares its local residual, a
            :class:`~easyedit_replay.targets.shares.Share` (``Divide()``, ``Full()``,
            ``Tau(0.25)``, ``Capacity()``, ``Joint()``, or a new subclass); a name of
            :data:`~easyedit_replay.targets.shares.SHARES` (``"divide"``) is turned
            into its strategy. The share's fields are the construction's parameters.
        replay: later edit layers' targets come from one replay forward pass of
            the first anchor.
        summary: one line for help texts.

    Raises:
        ValueError: ``share`` is a name that is not in ``SHARES``.
    """

    name: str
    anchors: Tuple[str, ...]
    edit: str
    measure: str
    share: Share
    replay: bool
    summary: str

    def __post_init__(self) -> None:
        if isinstance(self.share, str):
            if self.share not in SHARES:
                raise ValueError(f"Construction({self.name!r}).share = {self.share!r}; use a targets.Share "
                                 f"or one of {list(SHARES)}")
            object.__setattr__(self, "share", SHARES[self.share]())

    @property
    def suffix(self) -> str:
        """The ``alg_name`` suffix: :attr:`name` in upper case (``"blue"`` -> ``"BLUE"``)."""
        return self.name.upper()

    @property
    def param(self) -> str:
        """The hyperparameter a mode spec ``"name=value"`` sets (``replay_tau``), empty if
        the construction takes none: its share's ``param``."""
        return self.share.param

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

    def with_param(self, value: float) -> "Construction":
        """This construction with its parameter set (``replay_tau=0.25``: ``Tau(0.25)``).

        Raises:
            ValueError: the construction takes no parameter.
            HyperParamsError: a value out of the parameter's range.
        """
        return dataclasses.replace(self, share=self.share.with_param(value))

    def configured(self, hparams) -> "Construction":
        """This construction with the parameters it leaves open read from their YAML
        aliases in ``hparams`` (``replay_tau``; replay's ``replay_share``); a set
        parameter wins. Configuring twice changes nothing."""
        share = self.share.configured(hparams)
        return self if share == self.share else dataclasses.replace(self, share=share)

    def refusal(self, rule, hparams) -> Optional[str]:
        """Why the update rule ``rule`` with ``hparams`` cannot run this construction, or
        None when it can (its share decides: ``replay_joint`` refuses PMET)."""
        return self.share.refusal(rule, hparams)


CONSTRUCTIONS: Dict[str, Construction] = {c.name: c for c in (
    Construction("spread", (LAST,), "all", "last", Divide(), False,
                 "stock backward spreading: anchor at l_n, residual divided over the layers left"),
    Construction("replay", (FIRST,), "all", "own", Full(alias="replay_share"), True,
                 "forward replay (the paper's FE): anchor at l_1, replayed targets, full local residual"),
    Construction("replay_remaining", (FIRST,), "all", "own", Divide(), True,
                 "ablation: replayed targets with the stock share (residual divided over the layers left)"),
    Construction("blue", (FIRST, LAST), "ends", "own", Full(), False,
                 "BLUE: independent anchors at l_1 and l_n, only those two layers edited, full residuals"),
    Construction("onelayer", (LAST,), "last", "own", Full(), False,
                 "OneLayer: only l_n edited, stock anchor"),
    Construction("nodiv", (LAST,), "all", "last", Full(), False,
                 "spreading without dividing: every layer takes the full residual to the l_n anchor"),
    Construction("replay_tau", (FIRST,), "all", "own", Tau(), True,
                 "replayed targets, layer l_i takes 1/(layers left)^replay_tau of its residual (0: FE, 1: "
                 "replay_remaining)"),
    Construction("replay_capacity", (FIRST,), "all", "own", Capacity(), True,
                 "replayed targets, each layer's share from what the layers left can deliver (q/(1+q))"),
    Construction("replay_joint", (FIRST,), "all", "own", Joint(), True,
                 "replay's anchor, per-layer changes from one solve through the Jacobians between the edits"),
)}
MODES = tuple(CONSTRUCTIONS)  # the built-in constructions, in the paper's order


def register_construction(construction: Construction) -> Construction:
    """Add a target construction; every registered algorithm then has the
    ``alg_name`` ``f"{ALG}_{construction.suffix}"`` and its entry point.

    Raises:
        ValueError: a field outside its allowed values, or a combination the share
            cannot serve (:meth:`~easyedit_replay.targets.shares.Share.check`).
    """
    c = construction
    if not c.anchors or any(a not in (FIRST, LAST) for a in c.anchors):
        raise ValueError(f"Construction({c.name!r}).anchors must name 'first' and/or 'last'")
    if c.edit not in ("all", "ends", "last") or c.measure not in ("own", "last") or not isinstance(c.share, Share):
        raise ValueError(f"Construction({c.name!r}): edit in all/ends/last, measure in own/last, "
                         f"share a targets.Share (built in: {'/'.join(SHARES)})")
    if c.measure == "own" and not c.replay and c.edit == "all":
        raise ValueError(f"Construction({c.name!r}): edits every layer, measures each at itself, but has "
                         f"no replay to give the middle layers targets")
    c.share.check(c)
    CONSTRUCTIONS[c.name] = c
    return c


def get_construction(mode) -> Construction:
    """The :class:`Construction` named ``mode`` (a Construction passes through; a spec
    ``"replay_tau=0.25"`` sets the parameter).

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
    construction with a ``param`` (the value sets the construction's parameter and goes
    to that hyperparameter, its YAML alias), each optionally followed by ``+option``
    for registered sequential-editing options (``"replay+rekeyed"``,
    ``"replay_tau=0.25+norm_anchor"``; :data:`easyedit_replay.sequential.SEQUENTIAL_OPTIONS`),
    an option with a ``param`` optionally with a number (``"replay+refresh=4"``: also
    ``sequential_refresh_weight: 4``).

    Returns:
        ``(construction, {hyperparameter: value})``: the construction with the spec's
        parameter set, and the ``param`` value and the options' fields (an empty dict
        for a bare name).

    Raises:
        ValueError: an unknown name or option, a value for a construction or option
            without a parameter, a value that is not a number, or an option's value out
            of its range.
        HyperParamsError: a construction's value out of the parameter's range.
    """
    from ..sequential import parse_options

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
        number = float(value)
    except ValueError:
        raise ValueError(f"mode={spec!r}: {value!r} is not a number (e.g. {c.name}=0.5)") from None
    return c.with_param(number), {c.param: number, **params}


def mode_spec(spec) -> str:
    """The canonical spelling of a mode spec (``" replay_tau=0.250"`` -> ``"replay_tau=0.25"``,
    ``"replay + rekeyed"`` -> ``"replay+rekeyed"``, ``"replay+refresh=4.0"`` ->
    ``"replay+refresh=4"``, ``"replay+refresh=1"`` -> ``"replay+refresh"``: an option's
    value equal to what the option alone means is left out).

    Raises:
        ValueError: as :func:`parse_mode`.
    """
    from ..sequential import format_number, option_spec

    c, params = parse_mode(spec)
    options = [option_spec(o) for o in str(spec).split("+")[1:]]
    value = f"={format_number(params[c.param])}" if c.param and c.param in params else ""
    return c.name + value + "".join(f"+{o}" for o in options)


def anchor_layer(mode, layers: Sequence[int]) -> int:
    """The (single) anchor layer of a one-anchor construction: ``l_n`` for spreading,
    ``l_1`` for replay.

    Raises:
        ValueError: a two-anchor construction (BLUE), or ``mode`` unknown or with
            sequential options (from :func:`get_construction`).
    """
    found = get_construction(mode).anchor_layers(layers)
    if len(found) != 1:
        raise ValueError(f"mode {mode!r} optimizes anchors at {found}; use Construction.anchor_layers")
    return found[0]
