"""PMET's update rule (Li et al., AAAI 2024; EasyEdit ``pmet/pmet_main.execute_pmet``).

PMET rewrites up to two weights per edit layer, the attention output projection
and the MLP down-projection (``rewrite_module_tmps``, edited in the listed order
within each layer), and its targets are the OUTPUTS of those modules, not the
residual stream. The anchor (``compute_zs``) is always a pair of deltas, one on
the attention output (``attn_module_tmp``) and one on the MLP output
(``mlp_module_tmp``) of the anchor layer, optimized together with both weight
decays, the adaptive NLL factor (``nll_loss_factor``) and its early stop; a site
takes the delta of the attention output when its template is ``attn_module_tmp``
(or, as stock, contains ``"attn"``), else the MLP delta. Per site:

    dW = (R / sqrt(n - i)) K^T (K K^T + lambda C)^-1        (float64, i 0-based)

with ``C`` the second moment of that site's inputs. Spread mode measures the
current module output at the last edit layer (stock); replay mode measures it at
the edited layer itself and takes the target from one forward pass with both
anchor deltas added at the first edit layer (:mod:`easyedit_replay.targets`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, List, Optional, Sequence, Tuple

import torch

from ..anchors.objective import Objective
from ..errors import HyperParamsError, field_error
from ..hparams import ReplayHyperParams, is_number
from ..targets import TargetSite
from .base import Algorithm, Site, UpdateInputs


@dataclass(kw_only=True)
class PMETHyperParams(ReplayHyperParams):
    """EasyEdit's ``PMETHyperParams`` fields plus the replay fields.

    PMET adds ``rewrite_module_tmps`` (the rewritten modules per layer, e.g.
    ``["model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"]``) and
    ``nll_loss_factor`` (weight of the NLL term of the anchor objective, 0.1x once
    the target is the argmax). ``rewrite_module_tmp`` is kept (EasyEdit requires it)
    but unused by the rule.

    Ours: ``target_leading_space`` (default ``None``: stock ``execute_pmet``, which
    prepends a space to ``target_new`` only when the model's ``name_or_path``
    contains ``"gpt"``; ``true`` always, as MEMIT does, which byte-level BPE
    tokenizers such as SmolLM2's and Llama 3's need; ``false`` never).
    """

    rewrite_module_tmps: List[str]
    nll_loss_factor: float = 1.0
    # easyedit-replay: None = stock rule (a space only for "gpt" models); true/false forces it
    target_leading_space: Optional[bool] = None


    MODULE_TEMPLATES: ClassVar[Tuple[str, ...]] = ReplayHyperParams.MODULE_TEMPLATES + ("rewrite_module_tmps",)

    def __post_init__(self) -> None:
        """Base normalization plus a single template string -> a one-entry list."""
        super().__post_init__()
        if isinstance(self.rewrite_module_tmps, str):
            self.rewrite_module_tmps = [self.rewrite_module_tmps]

    def validate(self) -> None:
        """Base checks plus ``rewrite_module_tmps`` and ``nll_loss_factor``.

        Raises:
            HyperParamsError: naming the field and the fix.
        """
        super().validate()
        tmps = self.rewrite_module_tmps
        if not isinstance(tmps, (list, tuple)) or not tmps:
            raise field_error(HyperParamsError, "rewrite_module_tmps", tmps,
                              "must be a non-empty list of module templates, e.g. "
                              "['model.layers.{}.self_attn.o_proj', 'model.layers.{}.mlp.down_proj']")
        for t in tmps:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise field_error(HyperParamsError, "rewrite_module_tmps", tmps,
                                  f"entry {t!r} must be a module name template with one {{}} for the layer index")
        if len(set(tmps)) != len(tmps):
            raise field_error(HyperParamsError, "rewrite_module_tmps", tmps, "must not repeat a module")
        if self.target_leading_space not in (None, True, False):
            raise field_error(HyperParamsError, "target_leading_space", self.target_leading_space,
                              "must be true, false or null (null: EasyEdit's rule, a space only for GPT models)")
        f = self.nll_loss_factor
        if not is_number(f) or f <= 0:
            raise field_error(HyperParamsError, "nll_loss_factor", f, "must be a positive number (stock: 1)")

    def validate_for_model(self, model) -> None:
        """Base checks plus the two anchor modules (``attn_module_tmp``, ``mlp_module_tmp``)."""
        from ..tracing import resolve_module

        super().validate_for_model(model)
        for layer in self.layers:
            resolve_module(model, self.attn_module_tmp.format(layer), "attn_module_tmp")
            resolve_module(model, self.mlp_module_tmp.format(layer), "mlp_module_tmp")


ATTN, MLP = 0, 1  # indices of the anchor deltas (order of :meth:`PMET.anchor_templates`)


def anchor_site_of(template: str, hp) -> int:
    """Which anchor delta a rewritten module's output takes: the attention delta for
    ``attn_module_tmp`` (or, as ``execute_pmet`` decides, a name containing ``"attn"``),
    else the MLP delta."""
    if template == hp.attn_module_tmp:
        return ATTN
    if template == hp.mlp_module_tmp:
        return MLP
    return ATTN if "attn" in template else MLP


def pmet_solve(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, weight: float,
               protected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``resid @ K^T @ inverse(K K^T + weight * C (+ protected))`` in the order ``execute_pmet`` uses.

    Args:
        keys: ``[d_in, m]`` float64.
        resid: ``[d_out, m]`` float64, already divided by ``sqrt(n - i)``.
        cov: ``[d_in, d_in]`` second moment (used in float64).
        weight: ``mom2_update_weight`` (lambda).
        protected: ``[d_in, d_in]`` ``sum K_old K_old^T`` of earlier batches' keys at this
            site (``sequential_keys``), or None (stock).

    Returns:
        ``[d_out, d_in]`` float64 update.

    Source: EasyEdit ``pmet_main.execute_pmet`` (PMET paper, Li et al., AAAI 2024);
    with ``protected``, the FE authors' ``add_old_keys`` as in :func:`memit_solve`.
    """
    system = keys @ keys.T + weight * cov.double()
    if protected is not None:
        system = system + protected.double().to(system.device)
    return resid @ keys.T @ torch.inverse(system)


class PMET(Algorithm):
    name = "PMET"
    hparams_class = PMETHyperParams
    sqrt_share = True

    def leading_space(self, model, hp=None) -> bool:
        """``hp.target_leading_space`` when set; else stock ``execute_pmet``: a space is
        prepended to ``target_new`` only for models whose ``name_or_path`` contains ``"gpt"``."""
        forced = getattr(hp, "target_leading_space", None)
        if forced is not None:
            return bool(forced)
        name = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", ""))
        return "gpt" in name.lower()

    def anchor_templates(self, hp) -> List[str]:
        """``compute_zs`` always optimizes both deltas: attention output, MLP output."""
        return [hp.attn_module_tmp, hp.mlp_module_tmp]

    def anchor_objective(self, hp, layer: int, templates: Sequence[Sequence[str]],
                         site_templates: Optional[Sequence[str]] = None) -> Objective:
        """``compute_zs``' objective: the NLL weighted by ``nll_loss_factor``, with PMET's
        adaptive rule (the weight drops to a tenth once the target is the argmax)."""
        return replace(super().anchor_objective(hp, layer, templates, site_templates),
                       nll_factor=float(hp.nll_loss_factor), adaptive_nll=True)

    def sites(self, hp) -> List[Site]:
        """One site per ``rewrite_module_tmps`` entry, in order; the target is the
        rewritten module's own output."""
        return [Site(t, TargetSite(t, anchor_site_of(t, hp)), "rewrite_module_tmps") for t in hp.rewrite_module_tmps]

    def update(self, inp: UpdateInputs) -> torch.Tensor:
        """PMET's update for one site: :func:`pmet_solve` of ``inp.keys [d_in, m]`` and
        ``inp.error [d_out, m] / inp.divisor`` (``divisor`` is ``sqrt(n - i)``:
        ``sqrt_share``), mirroring EasyEdit ``pmet_main.execute_pmet``.

        Returns:
            ``[d_out, d_in]`` float64 update on ``inp.device``.
        """
        keys = inp.keys.double().to(inp.device)
        resid = inp.error.double().to(inp.device) / inp.divisor
        return pmet_solve(keys, resid, inp.cov.to(inp.device), inp.hparams.mom2_update_weight, inp.protected)
