"""MEMIT's update rule (Meng et al., 2023, eq. 14; EasyEdit ``memit_main.execute_memit``).

``dW = R K^T (lambda C + K K^T)^-1`` with ``R = error / (n - i)``, all in float64.
With protected keys of earlier batches (``sequential_keys``), ``lambda C + K K^T + G``,
``G = sum K_old K_old^T`` (the FE authors' ``add_old_keys``: their ``cache_c``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..hparams import ReplayHyperParams
from .base import Algorithm, UpdateInputs


@dataclass(kw_only=True)
class MEMITHyperParams(ReplayHyperParams):
    """EasyEdit's ``MEMITHyperParams`` fields plus the replay fields."""



def memit_solve(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, weight: float,
                protected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``resid @ solve(weight * cov + K K^T (+ protected), K)^T``.

    Args:
        keys: ``[d_in, m]`` float64.
        resid: ``[d_out, m]`` float64.
        cov: ``[d_in, d_in]`` second moment (any float dtype; used in float64).
        weight: ``mom2_update_weight`` (lambda).
        protected: ``[d_in, d_in]`` ``sum K_old K_old^T`` of earlier batches' keys, or
            None (stock).

    Returns:
        ``[d_out, d_in]`` float64 update.

    Source: EasyEdit ``memit_main.execute_memit``; with ``protected``, the FE authors'
    ``memit_main.batch_edit`` with ``add_old_keys`` (``K K^T + cache_c + coef * cov``).
    """
    system = weight * cov.double() + keys @ keys.T
    if protected is not None:
        system = system + protected.double().to(system.device)
    adj_k = torch.linalg.solve(system, keys)
    return resid @ adj_k.T


class MEMIT(Algorithm):
    name = "MEMIT"
    hparams_class = MEMITHyperParams

    def update(self, inp: UpdateInputs) -> torch.Tensor:
        """MEMIT's eq. 14 for one site: :func:`memit_solve` of ``inp.keys [d_in, m]`` and
        ``inp.error [d_out, m] / inp.divisor`` with ``lambda = mom2_update_weight`` and
        ``inp.protected`` (mirrors EasyEdit ``memit_main.execute_memit``).

        Returns:
            ``[d_out, d_in]`` float64 update on ``inp.device``.

        Raises:
            torch.linalg.LinAlgError: from ``torch.linalg.solve`` when
                ``lambda C + K K^T`` is singular (not caught here).
        """
        keys = inp.keys.double().to(inp.device)
        resid = inp.error.double().to(inp.device) / inp.divisor
        return memit_solve(keys, resid, inp.cov.to(inp.device), inp.hparams.mom2_update_weight, inp.protected)
