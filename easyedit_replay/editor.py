"""The loop every algorithm shares, and transactional weight writes.

``compute_edit``: requests -> context templates -> statistics (and algorithm
state) -> anchor -> targets -> for each edit layer, first to last, and each
rewritten site: keys and current state (one forward pass) -> residual -> update
rule -> write. The model is edited layer by layer, as the stock methods do, so
that each layer's keys and current states see the earlier layers' updates; at the
end every touched weight is restored and the updates are returned.

``apply_edit`` then adds the updates to the weights exactly as EasyEdit's
``apply_*_to_model`` do, inside a transaction: any exception (including
``KeyboardInterrupt``) restores every touched weight bit-identically.
"""

from __future__ import annotations

import logging
import time
import weakref
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .algorithms import get_algorithm
from .algorithms.base import Algorithm, UpdateInputs, match_shape
from .anchor import AnchorResult, optimize_anchors
from .errors import HyperParamsError, NumericalError, RequestError
from .keys import (
    EditRequest, average_over_templates, bare_probes, prepare_requests, read_at_lookup,
    sample_context_templates, template_probes, validate_templates,
)
from .stats import second_moments
from .targets import Targets, anchor_layer, build_targets, check_mode
from .tracing import resolve_parameter

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """Diagnostics of one site of one edit layer (norms are means over requests)."""

    step: int
    layer: int
    weight_name: str
    measure_layer: int
    error_norm: float      # |target - current| before this layer's update
    residual_norm: float   # |residual| handed to the rule
    update_norm: float     # Frobenius norm of the weight update


@dataclass
class EditPlan:
    """Result of :func:`compute_edit`: weight updates and everything needed to explain them."""

    alg_name: str
    mode: str
    requests: List[EditRequest]
    templates: List[List[str]]
    anchor: AnchorResult
    targets: Targets
    updates: Dict[str, torch.Tensor]
    records: List[LayerRecord]
    pending: Any = None
    seconds: float = 0.0
    # For diagnostics: target-site states of the unedited model and the residual
    # handed to each layer, keyed by (layer, site template), ``[R, d]`` float32.
    unedited: Dict[Tuple[int, str], torch.Tensor] = field(default_factory=dict)
    residuals: Dict[Tuple[int, str], torch.Tensor] = field(default_factory=dict)


@contextmanager
def weight_transaction(params: Dict[str, torch.nn.Parameter], restore_always: bool = False):
    """Snapshot ``params``; restore them bit-identically on any exception (or always)."""
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        yield saved
    except BaseException:
        _restore(params, saved)
        raise
    else:
        if restore_always:
            _restore(params, saved)


def _restore(params, saved):
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NumericalError(f"non-finite {what}; no weight was changed. Check the request, the statistics and v_lr")


def check_prompt_lengths(model, tok, reqs: Sequence[EditRequest]) -> None:
    """Reject prompts longer than the model's context before any computation.

    Raises:
        RequestError: naming the request and both lengths.
    """
    from .anchor import _max_positions

    limit = _max_positions(model)
    if limit is None:
        return
    for i, r in enumerate(reqs):
        n = len(tok(r.text)["input_ids"])
        if n >= limit:
            raise RequestError(
                f"requests[{i}].prompt has {n} tokens, more than the model's context of {limit} "
                f"(with the target appended); shorten the prompt"
            )


def resolve_templates(model, tok, hparams, context_templates=None) -> List[List[str]]:
    if context_templates is not None:
        return validate_templates(context_templates)
    return sample_context_templates(model, tok, seed=int(getattr(hparams, "context_seed", 0)))


def compute_edit(
    model,
    tok,
    requests: Sequence[dict],
    hparams,
    mode: Optional[str] = None,
    context_templates: Optional[List[List[str]]] = None,
    algorithm: Optional[Algorithm] = None,
    progress: bool = False,
    stats_dir=None,
    anchor: Optional[AnchorResult] = None,
    options: Optional[Dict[str, Any]] = None,
) -> EditPlan:
    """Compute the weight updates of one batch edit; the model is left unchanged.

    Args:
        requests: EasyEdit request dicts (``prompt``, ``subject``, ``target_new``, ...).
        hparams: a plugin hyperparameter dataclass (``alg_name`` picks the rule and,
            unless ``mode`` is given, the mode).
        mode: ``"replay"`` or ``"spread"`` (default: from ``alg_name``).
        context_templates: inject templates (default: sampled, seeded, cached).
        options: extra keyword arguments of the ``apply_*`` call, handed to the
            algorithm's ``prepare`` (e.g. AlphaEdit's ``reset_cache``).
        anchor: reuse an anchor optimized earlier for the same requests, layer and
            templates (sweeps over update-rule settings); it must sit at the
            mode's anchor layer.

    Returns:
        :class:`EditPlan` with ``updates[weight_name]`` shaped like the weight
        (float64 for MEMIT/EMMET/PMET, float32 for AlphaEdit).

    Raises:
        HyperParamsError, RequestError, NumericalError, StatisticsError. Whatever
        is raised, every weight is bit-identical to before.
    """
    started = time.perf_counter()
    reg = get_algorithm(hparams.alg_name)
    rule = algorithm or reg.rule
    mode = mode or reg.mode
    check_mode(mode)
    hparams.validate()
    hparams.validate_for_model(model)
    reqs = prepare_requests(requests, leading_space=rule.leading_space(model, hparams))
    check_prompt_lengths(model, tok, reqs)
    templates = resolve_templates(model, tok, hparams, context_templates)
    layers = list(hparams.layers)
    sites = rule.sites(hparams)
    weight_names = [f"{s.rewrite_template.format(l)}.weight" for l in layers for s in sites]
    params = {n: resolve_parameter(model, n) for n in weight_names}
    modules = [s.rewrite_template.format(l) for l in layers for s in sites]
    covs = second_moments(model, tok, hparams, modules, stats_dir=stats_dir, progress=progress)
    state = rule.prepare(model, tok, hparams, covs, {**dict(options or {}), "stats_dir": stats_dir or hparams.stats_dir})

    anchor_templates = rule.anchor_templates(hparams)
    if anchor is None:
        anchor = optimize_anchors(
            model, tok, reqs, hparams, anchor_layer(mode, layers), anchor_templates, templates,
            progress=progress, **rule.anchor_objective(hparams),
        )
    elif anchor.layer != anchor_layer(mode, layers) or anchor.delta.shape[1] != len(reqs):
        raise HyperParamsError(
            f"the anchor passed in sits at layer {anchor.layer} for {anchor.delta.shape[1]} requests; "
            f"{mode} with layers {layers} needs layer {anchor_layer(mode, layers)} for {len(reqs)} requests"
        )
    targets = build_targets(
        model, tok, reqs, hparams, anchor, mode, [s.target for s in sites], anchor_templates, rule.sqrt_share,
    )
    for key, value in targets.values.items():
        _check_finite(value, f"target at layer {key[0]} ({key[1]})")

    key_probes = template_probes(tok, reqs, templates, hparams.fact_token)
    now_probes = bare_probes(tok, reqs, hparams.fact_token)
    n_keys = len(key_probes)
    site_names = {(l, s.target.template): s.target.template.format(l) for l in layers for s in sites}
    reads = read_at_lookup(model, tok, now_probes, outputs=list(site_names.values()))
    unedited = {key: reads["out:" + name].float() for key, name in site_names.items()}
    residuals: Dict[Tuple[int, str], torch.Tensor] = {}
    updates: Dict[str, torch.Tensor] = {}
    records: List[LayerRecord] = []
    pending = None
    with weight_transaction(params, restore_always=True) as originals:
        for step, layer in enumerate(layers):
            for si, site in enumerate(sites):
                rewrite = site.rewrite_template.format(layer)
                wname = f"{rewrite}.weight"
                measure = targets.measure_layer(step)
                target_module = site.target.template.format(measure)
                reads = read_at_lookup(
                    model, tok, key_probes + now_probes, outputs=[target_module], inputs=[rewrite],
                )
                keys = average_over_templates(reads["in:" + rewrite][:n_keys], templates)  # [R, d_in]
                current = reads["out:" + target_module][n_keys:]  # [R, d_out]
                error = targets.local_error(step, site.target, current)
                _check_finite(keys, f"keys at {rewrite}")
                _check_finite(error, f"residual at layer {layer}")
                weight = params[wname]
                upd = rule.update(UpdateInputs(
                    step=step, layer=layer, site_index=si, weight_name=wname, keys=keys.T, error=error.T,
                    divisor=targets.divisor(step), cov=covs[rewrite], hparams=hparams, state=state,
                    device=weight.device,
                ))
                upd = match_shape(upd, weight.shape, wname)
                _check_finite(upd, f"update of {wname}")
                with torch.no_grad():
                    orig = originals[wname]
                    weight.copy_((orig.to(device=upd.device, dtype=upd.dtype) + upd).to(weight.dtype))
                updates[wname] = upd.detach()
                residuals[(layer, site.target.template)] = (error.double() / targets.divisor(step)).float()
                records.append(LayerRecord(
                    step, layer, wname, measure,
                    float(error.float().norm(dim=-1).mean()),
                    float((error.double() / targets.divisor(step)).norm(dim=-1).mean()),
                    float(upd.norm()),
                ))
                log.debug("layer %d %s: |error| %.3f |upd| %.3f", layer, wname, records[-1].error_norm, records[-1].update_norm)
        pending = rule.finalize(model, tok, hparams, state, dict(requests=reqs, templates=templates))
    return EditPlan(hparams.alg_name, mode, reqs, templates, anchor, targets, updates, records, pending,
                    time.perf_counter() - started, unedited, residuals)


_LAST_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def last_plan(model) -> Optional[EditPlan]:
    """The :class:`EditPlan` of the last successful plugin edit of ``model`` (diagnostics)."""
    return _LAST_PLANS.get(model)


def apply_edit(
    model,
    tok,
    requests: Sequence[dict],
    hparams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    keep_original_weight: bool = False,
    mode: Optional[str] = None,
    context_templates=None,
    progress: bool = False,
    anchor: Optional[AnchorResult] = None,
    **kwargs,
) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """EasyEdit's ``apply_*_to_model`` contract for every plugin algorithm.

    Returns ``(model, weights_copy)``: ``weights_copy`` maps each rewritten
    parameter name to its original tensor when ``return_orig_weights`` is true (empty
    otherwise). With ``copy=True`` a deep copy is edited and the input model is
    untouched. Any exception leaves every weight bit-identical to before.
    ``cache_template`` (EasyEdit's per-case anchor cache) is accepted for signature
    compatibility and not used. ``anchor`` reuses an anchor optimized earlier on the
    same unedited weights (see :func:`compute_edit`); the applied plan's anchor is
    ``last_plan(model).anchor``.
    """
    if copy:
        model = deepcopy(model)
    plan = compute_edit(model, tok, requests, hparams, mode=mode, context_templates=context_templates,
                        progress=progress, anchor=anchor, options=kwargs)
    weights_copy: Dict[str, torch.Tensor] = {}
    params = {n: resolve_parameter(model, n) for n in plan.updates}
    with weight_transaction(params):
        with torch.no_grad():
            for name, upd in plan.updates.items():
                w = params[name]
                if return_orig_weights and name not in weights_copy:
                    weights_copy[name] = w.detach().clone()
                w[...] += upd.to(device=w.device, dtype=w.dtype)
        get_algorithm(hparams.alg_name).rule.commit(model, hparams, plan.pending)
    _LAST_PLANS[model] = plan
    return model, weights_copy
