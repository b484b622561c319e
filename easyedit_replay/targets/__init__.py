"""Target constructions: backward spreading, forward replay, the paper's baselines and
the shares beyond the paper (docs/method.md; Liu et al., ICML 2026, sections 4-5).

A construction is one value, :class:`Construction`, that travels unchanged from a mode
spec (``compare --modes``) or an ``alg_name`` suffix (decoded once, at the EasyEdit
entry point) to :func:`easyedit_replay.editor.compute_edit`. The package, one concern
per module:

- :mod:`.construction`: :class:`Construction`, the registry (:data:`CONSTRUCTIONS`,
  :func:`register_construction`) and mode specs (:func:`parse_mode`);
- :mod:`.shares`: one strategy class per way of sharing the residual (:class:`Divide`,
  :class:`Full`, :class:`Tau`, :class:`Capacity`, :class:`Joint`), each preparing its
  edit (``prepare``) and giving each layer's share (``divisor``): a new way of
  sharing is one :class:`Share` subclass in a registered construction;
- :mod:`.build`: the targets (:func:`build_targets`, the replay forward pass,
  :func:`final_hidden_target`) and :class:`Targets`;
- :mod:`.joint`: the joint plan of ``replay_joint``.

:mod:`easyedit_replay.editor` reads a construction's fields (which layers get anchors
and edits, where the current state is measured) and calls its share; the update rules
(:mod:`easyedit_replay.algorithms`) never see the construction.

Edit layers ``R = [l_1 < ... < l_n]`` (``hparams.layers``). A target construction
(:class:`Construction`, the "mode") says

- where anchors are optimized (the first and/or the last edit layer),
- which layers are edited (all, the first and last, or only the last),
- where the current state of each edited layer is measured (at ``l_n``, as the
  stock methods do, or at the edited layer itself),
- which share of the local residual each layer takes (:mod:`.shares`: divided by the
  number of edited layers left, the full residual, ...),
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
    (the default) or ``(z^{l_i} - h^{l_i}_cur) / (n - i)`` (PMET ``sqrt``; the YAML
    key ``replay_share: remaining``, an ablation).
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
    targets. ``tau`` is the construction's parameter: the mode spec ``replay_tau=0.25``
    sets it, and the YAML key ``replay_tau`` (default 0.5) when the spec does not.
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
    q_j J_j J_j^T) mu = r`` (:mod:`.joint`). Layer ``l_j`` targets the
    planned state ``t_j`` (the unedited model with ``d_1..d_j`` added) and takes
    ``(1 + q_j) / q_j`` of its local residual; the last layer its full residual to
    ``z^{l_n}``.

With one edit layer every construction gives bit-identical targets and residuals.
"""

from __future__ import annotations

from .shares import SHARES, Capacity, Divide, Full, Joint, Share, ShareContext, Tau
from .construction import (
    CONSTRUCTIONS, FIRST, LAST, MODES, Construction, anchor_layer, get_construction, mode_spec, parse_mode,
    register_construction,
)
from .build import TargetSite, Targets, build_targets, final_hidden_target, replay_forward

__all__ = [
    "CONSTRUCTIONS", "FIRST", "LAST", "MODES", "SHARES", "Capacity", "Construction", "Divide", "Full", "Joint",
    "Share", "ShareContext", "TargetSite", "Targets", "Tau", "anchor_layer", "build_targets",
    "final_hidden_target", "get_construction", "mode_spec", "parse_mode", "register_construction",
    "replay_forward",
]
