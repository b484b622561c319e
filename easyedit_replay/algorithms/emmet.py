"""EMMET's update rule (Gupta et al., 2024, "A unified framework for model editing";
EasyEdit ``emmet/emmet_main.execute_emmet``).

Equality-constrained batched editing, in float64 exactly as stock:

- ``C' = mom2_update_weight * C`` (``+ update_norm_lambda * I`` when non-zero),
- ``D = K^T C'^-1 K + emmet_lambda * I`` (``[m, m]``, m = requests),
- ``dW = R (D^-1 K^T C'^-1)`` with ``R = error / (n - i)`` (the stock share; replay
  hands the local residual through the same division).

Stock inverts ``D`` with ``torch.inverse`` and falls back to the pseudo-inverse when
that raises (``D`` singular); so do we, and we log it.

With protected keys of earlier batches (``sequential_keys``), ``C' += G``, ``G = sum
K_old K_old^T`` (the FE authors' EMMET with ``add_old_keys``: ``coef * cov + cache_c``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import HyperParamsError, NumericalError, field_error
from ..hparams import ReplayHyperParams, is_number
from .base import Algorithm, UpdateInputs

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EMMETHyperParams(ReplayHyperParams):
    """EasyEdit's ``EMMETHyperParams`` fields plus the replay fields.

    ``update_norm_lambda``: added to the scaled covariance's diagonal (stock default 0).
    ``emmet_lambda``: added to the diagonal of ``D`` against ill-conditioning (stock 0.1).
    """

    update_norm_lambda: float = 0
    emmet_lambda: float = 0.1


    def validate(self) -> None:
        """Base checks plus ``update_norm_lambda`` and ``emmet_lambda``.

        Raises:
            HyperParamsError: a base field (:meth:`ReplayHyperParams.validate`), or
                ``update_norm_lambda`` / ``emmet_lambda`` not a non-negative number.
        """
        super().validate()
        for name in ("update_norm_lambda", "emmet_lambda"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise field_error(HyperParamsError, name, value, "must be a non-negative number (stock: "
                                  "update_norm_lambda 0, emmet_lambda 0.1)")


def emmet_solve(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, mom2_update_weight: float,
                update_norm_lambda: float, emmet_lambda: float, where: str = "",
                protected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EMMET's closed form ``resid @ (D^-1 K^T C'^-1)`` in float64.

    Args:
        keys: ``[d_in, m]`` keys ``K``.
        resid: ``[d_out, m]`` residuals ``R`` (already divided by the share).
        cov: ``[d_in, d_in]`` second moment ``C``.
        mom2_update_weight, update_norm_lambda, emmet_lambda: see
            :class:`EMMETHyperParams`.
        where: weight name, for messages.
        protected: ``[d_in, d_in]`` ``sum K_old K_old^T`` added to ``C'``, or None (stock).

    Returns:
        ``[d_out, d_in]`` float64 update.

    Raises:
        NumericalError: ``C'`` is singular (raise ``update_norm_lambda`` or collect
            statistics over more tokens).

    Source: EasyEdit ``execute_emmet`` (same order of operations: ``C^-1`` by
    ``torch.inverse``, ``D = K^T C^-1 K``, ``adj = (D^-1 K^T C^-1)^T``,
    ``upd = R adj^T``).
    """
    keys, resid, cov = keys.double(), resid.double(), cov.double()
    if mom2_update_weight != 1:
        cov = cov * mom2_update_weight
    if update_norm_lambda != 0:
        cov = cov + update_norm_lambda * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    if protected is not None:
        cov = cov + protected.double().to(cov.device)
    try:
        c_inv = torch.inverse(cov)
    except torch.linalg.LinAlgError as exc:
        raise NumericalError(
            f"EMMET at {where}: the scaled covariance is singular ({exc}); set update_norm_lambda > 0 "
            f"or collect the statistics over more tokens (mom2_n_samples)"
        ) from None
    d = keys.T @ c_inv @ keys
    d = d + emmet_lambda * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
    try:
        d_inv = torch.inverse(d)
    except torch.linalg.LinAlgError:
        log.warning("EMMET at %s: D (%d x %d) is singular; using its pseudo-inverse (as stock). "
                    "Duplicate requests in one batch, or emmet_lambda = 0, cause this.", where, *d.shape)
        d_inv = torch.linalg.pinv(d)
    adj_k = (d_inv @ keys.T @ c_inv).T
    return resid @ adj_k.T


class EMMET(Algorithm):
    name = "EMMET"
    hparams_class = EMMETHyperParams

    def capacity(self, keys, cov, hp, state, weight_name) -> torch.Tensor:
        """``q = k^T C'^{-1} k / emmet_lambda`` with ``C' = lambda C + update_norm_lambda I``:
        one key's relaxed equality solve realizes ``q / (1 + q)`` (``D = K^T C'^-1 K +
        emmet_lambda I``); ``emmet_lambda = 0`` gives ``inf`` (an exact constraint).

        Args:
            keys: ``[d_in, m]`` keys; cov: ``[d_in, d_in]`` second moment.

        Returns:
            ``[m]`` float64 capacities.

        Source: ours (Sherman-Morrison on EasyEdit ``execute_emmet``'s ``D``), for the
        ``replay_capacity`` construction.
        """
        keys = keys.double()
        c = hp.mom2_update_weight * cov.double().to(keys.device)
        if hp.update_norm_lambda != 0:
            c = c + hp.update_norm_lambda * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        q = (keys * torch.linalg.solve(c, keys)).sum(dim=0)
        return q / hp.emmet_lambda if hp.emmet_lambda else torch.full_like(q, math.inf)

    def refresh_weight_refusal(self, hp) -> Optional[str]:
        """EMMET's solve with ``emmet_lambda > 0`` is the least-squares problem ``min tr(dW C'
        dW^T) + (1 / emmet_lambda) sum_j |dW k_j - r_j|^2`` (its normal equations
        ``dW (emmet_lambda C' + K K^T) = R K^T`` give the closed form by the push-through
        identity), so a row weight ``w`` (``sqrt(w)`` on the row's key and residual) is
        that row's constraint relaxed by ``emmet_lambda / w`` instead of
        ``emmet_lambda``. With ``emmet_lambda = 0`` every row is an exact equality
        constraint and a weight cancels out of the solve (``D^-1`` absorbs it): refused.

        Source: ours (EMMET's equality-constrained objective, Gupta et al., 2024, with
        EasyEdit ``execute_emmet``'s ``emmet_lambda`` relaxation)."""
        if hp.emmet_lambda == 0:
            return ("with emmet_lambda 0 every row of EMMET's solve is an exact equality constraint, and a "
                    "row weight cancels out; set emmet_lambda > 0 (stock 0.1) or leave the weight at 1")
        return None

    def update(self, inp: UpdateInputs) -> torch.Tensor:
        """EMMET's update for one site: :func:`emmet_solve` of ``inp.keys [d_in, m]`` and
        ``inp.error [d_out, m] / inp.divisor`` (mirrors EasyEdit ``execute_emmet``).

        Returns:
            ``[d_out, d_in]`` float64 update on ``inp.device``.

        Raises:
            NumericalError: from :func:`emmet_solve`, ``C'`` singular.
        """
        hp = inp.hparams
        resid = inp.error.double().to(inp.device) / inp.divisor
        return emmet_solve(inp.keys.to(inp.device), resid, inp.cov.to(inp.device), hp.mom2_update_weight,
                           hp.update_norm_lambda, hp.emmet_lambda, inp.weight_name, inp.protected)
