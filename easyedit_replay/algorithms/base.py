"""What an algorithm contributes to the shared editing loop: an update rule.

Everything else (requests, context templates, anchor optimization, targets, keys,
statistics, the layer loop, transactions) lives in :mod:`easyedit_replay.editor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..anchors.objective import Objective
from ..targets import TargetSite


@dataclass
class Site:
    """One rewritten weight per edit layer.

    ``rewrite_template`` names the module whose weight is rewritten (keys are its
    inputs); ``target`` names the module output the residual is measured on;
    ``field`` is the hyperparameter an error about the template names.
    """

    rewrite_template: str
    target: TargetSite
    field: str = "rewrite_module_tmp"


@dataclass
class UpdateInputs:
    """Everything an update rule sees for one site of one layer.

    Shapes: ``keys [d_in, m]`` (m = requests; already averaged over context
    templates), ``error [d_out, m]`` = target - current in the model dtype,
    ``divisor`` the share (``n - i``, its sqrt, or 1; for ``replay_capacity`` a ``[m]``
    tensor, one per request, so ``error / divisor`` divides each column), ``cov
    [d_in, d_in]`` the second moment ``E[k k^T]`` (float32).

    ``protected``: ``[d_in, d_in]`` float64 ``sum K_old K_old^T`` over the keys of
    earlier batches this solve must preserve (``hparams.sequential_keys``,
    :mod:`easyedit_replay.sequential`), or None: the rule's stock solve, unchanged.

    ``restored``: how many of the last columns of ``keys`` and ``error`` are earlier
    edits restored by ``hparams.sequential_refresh`` (0: none), already multiplied by
    ``sqrt(hparams.sequential_refresh_weight)`` (not touched at the default 1). MEMIT
    and EMMET solve them as ordinary rows; a rule that keeps the keys of its own edits
    (AlphaEdit's sequential cache) keeps only the first ``m - restored``.
    """

    step: int
    layer: int
    site_index: int
    weight_name: str
    keys: torch.Tensor
    error: torch.Tensor
    divisor: Any  # float, or a [m] tensor
    cov: torch.Tensor
    hparams: Any
    state: Dict[str, Any]
    device: torch.device
    protected: Optional[torch.Tensor] = None
    restored: int = 0


class Algorithm:
    """Base class: subclasses set ``name``, ``hparams_class`` and implement :meth:`update`."""

    name: str = ""
    hparams_class = None
    sqrt_share: bool = False
    # EasyEdit's hyperparameter class of this algorithm (easyeditor.<name>HyperParams).
    host_hparams: str = ""
    # The stock rule already protects the keys of earlier batches as read at their edit
    # (AlphaEdit's sequential cache), so ``sequential_keys: edit_time`` adds nothing.
    keeps_edit_time_keys: bool = False

    @property
    def host_hparams_name(self) -> str:
        """EasyEdit's hyperparameter class name for this rule: ``host_hparams`` when set,
        else ``f"{name}HyperParams"`` (``MEMITHyperParams``, ...)."""
        return self.host_hparams or f"{self.name}HyperParams"

    # -- request normalization / anchor objective
    def leading_space(self, model, hp=None) -> bool:
        """Whether a space is prepended to ``target_new`` (EasyEdit MEMIT: always)."""
        return True

    def anchor_templates(self, hp) -> List[str]:
        """Module templates whose outputs receive the anchor deltas."""
        return [hp.layer_module_tmp]

    def anchor_objective(self, hp, layer: int, templates: Sequence[Sequence[str]],
                         site_templates: Optional[Sequence[str]] = None) -> Objective:
        """The anchor objective at ``layer`` (EasyEdit's ``compute_z``) for the context
        ``templates``, with the deltas at ``site_templates`` (default
        :meth:`anchor_templates`; the editor passes them adjusted for post-norm blocks):
        what :func:`~easyedit_replay.anchors.optimize_anchors` minimizes and the anchor
        cache keys."""
        sites = self.anchor_templates(hp) if site_templates is None else site_templates
        return Objective.of(hp, layer, sites, templates)

    def sites(self, hp) -> List[Site]:
        """Rewritten weights per layer, in the order they are edited."""
        return [Site(hp.rewrite_module_tmp, TargetSite(hp.layer_module_tmp, 0))]

    # -- statistics and per-batch state
    def prepare(self, model, tok, hp, covs: Dict[str, torch.Tensor], options: Dict[str, Any]) -> Dict[str, Any]:
        """Per-batch state computed before any weight is written (e.g. projections).

        ``covs`` maps each rewritten module name to its second moment; ``options``
        are the extra keyword arguments of the ``apply_*`` call (e.g. AlphaEdit's
        ``reset_cache``)."""
        return {}

    def update(self, inp: UpdateInputs) -> torch.Tensor:
        """The weight update ``[d_out, d_in]`` for one site (float64 unless stated)."""
        raise NotImplementedError

    def capacity(self, keys: torch.Tensor, cov: torch.Tensor, hp, state: Dict[str, Any],
                 weight_name: str) -> torch.Tensor:
        """``[m]`` float64 capacity ``q = k^T B^{-1} k`` of this rule for each key alone: a
        solve for one key realizes ``q / (1 + q)`` of the requested change and costs
        ``|d|^2 / q`` (its regularizer) for a delivered change ``d`` (the
        ``replay_capacity`` construction, :mod:`easyedit_replay.targets`).

        Args:
            keys: ``[d_in, m]`` keys (averaged over context templates).
            cov: ``[d_in, d_in]`` second moment of the rewritten module's input.

        Default (MEMIT's and PMET's ridge solve ``(lambda C + K K^T)``): ``B = lambda C``,
        ``lambda = mom2_update_weight`` (Sherman-Morrison on MEMIT's eq. 14).
        """
        keys = keys.double()
        solved = torch.linalg.solve(hp.mom2_update_weight * cov.double().to(keys.device), keys)
        return (keys * solved).sum(dim=0)

    def refresh_weight_refusal(self, hp) -> Optional[str]:
        """Why this rule with ``hp`` cannot weigh the earlier edits' rows of a
        ``sequential_refresh`` solve by ``hp.sequential_refresh_weight`` (not 1), or None
        when it can. Default None: a least-squares solve (MEMIT's ridge, AlphaEdit's
        projected one) takes row weights as ``sqrt(w)`` on each row's key and residual."""
        return None

    def finalize(self, model, tok, hp, state, context) -> Optional[Any]:
        """Called with every update written, before weights are restored; returns
        pending state that :meth:`commit` stores once the edit has succeeded.

        ``context``: ``{"requests", "templates", "sequential"}`` (the batch's
        :class:`~easyedit_replay.sequential.SequentialContext`, or None)."""
        return None

    def commit(self, model, hp, pending) -> None:
        """Store ``pending`` (only after a successful edit)."""


def match_shape(update: torch.Tensor, shape: torch.Size, where: str = "") -> torch.Tensor:
    """EasyEdit's ``upd_matrix_match_shape``: transpose for GPT-2/GPT-J style Conv1D weights.

    Raises:
        ValueError: neither the update nor its transpose has the weight's shape.
    """
    if update.shape == shape:
        return update
    if update.T.shape == shape:
        return update.T
    raise ValueError(f"update of shape {tuple(update.shape)} does not fit weight {where} of shape {tuple(shape)}")
