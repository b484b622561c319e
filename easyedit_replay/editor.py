"""The loop every algorithm shares, and transactional weight writes.

``compute_edit``: requests -> context templates -> statistics (and algorithm
state) -> anchor -> targets -> for each edit layer, first to last, and each
rewritten site: keys and current state (one forward pass) -> residual -> update
rule -> write (:func:`_edit_site`). The model is edited layer by layer, as the stock methods do, so
that each layer's keys and current states see the earlier layers' updates; at the
end every touched weight is restored and the updates are returned.

``apply_edit`` then adds the updates to the weights exactly as EasyEdit's
``apply_*_to_model`` do, inside a transaction: any exception (including
``KeyboardInterrupt``) restores every touched weight bit-identically.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
import dataclasses
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .algorithms import get_algorithm
from .algorithms.base import Algorithm, UpdateInputs, match_shape
from .anchors import AnchorResult, optimize_anchors
from .batching import token_ids
from .errors import HyperParamsError, RequestError, check_finite as _check_finite
from .prompts import EditRequest, prepare_requests, sample_context_templates, validate_templates
from .reads import average_over_templates, bare_probes, read_at_lookup, template_probes
from .model_info import max_positions
from .postnorm import PostNorm, anchor_templates as post_norm_anchor_templates, post_norms
from .precision import HALF_DTYPES, in_float32_window
from . import sequential
from .stats import second_moments
from .targets import Construction, ShareContext, Targets, build_targets, final_hidden_target, get_construction
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
class Trajectory:
    """Residual-stream states at the lookup token along the layer-by-layer edit (the
    paper's section-4 analyses), all ``[R, d]`` float32 at ``layer_module_tmp``.

    Attributes:
        final_layer: ``l_n``.
        final_target: ``m_L``, the state at ``l_n`` the construction's final target
            implies (:func:`~easyedit_replay.targets.final_hidden_target`).
        unedited: ``{layer: h}`` of the unedited model for every edit layer.
        after: ``{edited layer: {layer: h}}`` right after that layer's update is
            written (and every earlier edited layer's), for every edit layer.
    """

    final_layer: int
    final_target: torch.Tensor
    unedited: Dict[int, torch.Tensor]
    after: Dict[int, Dict[int, torch.Tensor]] = field(default_factory=dict)


@dataclass
class EditPlan:
    """Result of :func:`compute_edit`: weight updates and everything needed to explain them."""

    alg_name: str
    mode: str
    requests: List[EditRequest]
    templates: List[List[str]]
    anchors: Dict[int, AnchorResult]
    targets: Targets
    updates: Dict[str, torch.Tensor]
    records: List[LayerRecord]
    pending: Any = None
    seconds: float = 0.0
    # For diagnostics: target-site states of the unedited model and the residual
    # handed to each layer, keyed by (layer, site template), ``[R, d]`` float32.
    unedited: Dict[Tuple[int, str], torch.Tensor] = field(default_factory=dict)
    residuals: Dict[Tuple[int, str], torch.Tensor] = field(default_factory=dict)
    trajectory: Optional[Trajectory] = None
    # The model's sequential-editing record as this edit used it, and this batch's entry
    # (committed by apply_plan): :class:`easyedit_replay.sequential.SequentialContext`.
    sequential: Optional[sequential.SequentialContext] = None

    @property
    def anchor(self) -> AnchorResult:
        """The anchor of a one-anchor construction (spread: ``l_n``, replay: ``l_1``); for
        BLUE the one at ``l_n``."""
        return self.anchors[max(self.anchors)]


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


def check_prompt_lengths(model, tok, reqs: Sequence[EditRequest]) -> None:
    """Reject prompts longer than the model's context before any computation.

    Raises:
        RequestError: naming the request and both lengths.
    """
    limit = max_positions(model)
    if limit is None:
        return
    for i, r in enumerate(reqs):
        n = len(token_ids(tok, r.text))
        if n >= limit:
            raise RequestError(
                f"requests[{i}].prompt has {n} tokens, more than the model's context of {limit} "
                f"(with the target appended); shorten the prompt"
            )


def resolve_templates(model, tok, hparams, context_templates=None) -> List[List[str]]:
    """The context templates of an edit: ``context_templates`` checked when given, else
    sampled from the model with seed ``hparams.context_seed`` (0 when missing), as
    EasyEdit's ``get_context_templates`` (:func:`~easyedit_replay.prompts.sample_context_templates`).

    Returns:
        Groups of templates with one ``{}`` each, ``[["{}"], [prefix + ". {}", ...]]``.

    Raises:
        RequestError: from :func:`~easyedit_replay.prompts.validate_templates`, injected
            templates that are not non-empty groups of strings with one ``{}``.
    """
    if context_templates is not None:
        return validate_templates(context_templates)
    return sample_context_templates(model, tok, seed=int(getattr(hparams, "context_seed", 0)))


@dataclass
class _Setup:
    """Stage 1 of :func:`compute_edit`: everything fixed before any anchor is optimized
    (``covs`` empty and ``state`` and ``sequential`` None when set up for the anchors alone)."""

    rule: Algorithm
    construction: Construction
    requests: List[EditRequest]
    templates: List[List[str]]
    sites: list
    params: Dict[str, torch.nn.Parameter]
    covs: Dict[str, torch.Tensor]
    state: Any
    anchor_templates: List[str]
    post_norms: Dict[int, PostNorm] = field(default_factory=dict)  # {layer: norm after its rewrite} (postnorm.py)
    sequential: Optional[sequential.SequentialContext] = None


def _setup(model, tok, requests, hparams, construction, context_templates, progress, stats_dir, options,
           statistics: bool = True) -> _Setup:
    """Stage 1; with ``statistics`` False the second moments and the rule's ``prepare``
    (which only the update rule reads, never an anchor) are skipped. The construction's
    open parameters are read from their YAML aliases here, once."""
    rule = get_algorithm(hparams.alg_name).rule
    construction = get_construction(construction)
    hparams.validate()
    hparams.validate_for_model(model)
    construction = construction.configured(hparams)
    sites = rule.sites(hparams)
    edit_layers = construction.edit_layers(hparams.layers)
    params = {}
    for layer in hparams.layers:
        for site in sites:
            name = f"{site.rewrite_template.format(layer)}.weight"
            param = resolve_parameter(model, name, site.field)  # every layer: statistics need them all
            if layer in edit_layers:
                params[name] = param
    reqs = prepare_requests(requests, leading_space=rule.leading_space(model, hparams))
    check_prompt_lengths(model, tok, reqs)
    templates = resolve_templates(model, tok, hparams, context_templates)
    covs, state, seq = {}, None, None
    if statistics:
        modules = [s.rewrite_template.format(l) for l in hparams.layers for s in sites]
        covs = second_moments(model, tok, hparams, modules, stats_dir=stats_dir, progress=progress)
        state = rule.prepare(model, tok, hparams, covs, {**dict(options or {}), "stats_dir": stats_dir or hparams.stats_dir})
        seq = sequential.prepare(model, hparams, rule, reqs, templates, params, options)
    norms = post_norms(model, hparams, sites)  # {} for additive blocks (LLaMA, ...)
    return _Setup(rule, construction, reqs, templates, sites, params, covs, state,
                  post_norm_anchor_templates(rule.anchor_templates(hparams), hparams, norms), norms, seq)


def _anchors(model, tok, hparams, setup: _Setup, given, progress) -> Dict[int, AnchorResult]:
    """Stage 2: one :class:`AnchorResult` per anchor layer of the construction, reusing
    ``given`` where it has the layer: one AnchorResult (which must sit at the
    construction's anchor layer) or a pool ``{layer: AnchorResult}`` (layers it lacks
    are optimized)."""
    single = isinstance(given, AnchorResult)
    given = {given.layer: given} if single else dict(given or {})

    def misfit(anchor: AnchorResult, layer: int) -> HyperParamsError:
        return HyperParamsError(
            f"the anchor passed in sits at layer {anchor.layer} for {anchor.delta.shape[1]} requests; "
            f"{setup.construction.name} with layers {list(hparams.layers)} needs layer {layer} "
            f"for {len(setup.requests)} requests")

    out = {}
    for layer in setup.construction.anchor_layers(hparams.layers):
        found = given.get(layer)
        if found is None:
            if single:
                raise misfit(next(iter(given.values())), layer)
            objective = setup.rule.anchor_objective(hparams, layer, setup.templates, setup.anchor_templates)
            found = optimize_anchors(model, tok, setup.requests, objective, chunk_size=hparams.anchor_batch_size,
                                     cache=hparams.anchor_cache, progress=progress)
        elif found.delta.shape[1] != len(setup.requests):
            raise misfit(found, layer)
        elif list(found.sites) != [t.format(layer) for t in setup.anchor_templates]:
            raise HyperParamsError(
                f"the anchor passed in at layer {layer} sits at {list(found.sites)}; this edit optimizes its "
                f"anchor at {[t.format(layer) for t in setup.anchor_templates]} (hparams.post_norm and the "
                f"rule's anchor sites decide); pass an anchor optimized for it, or none")
        out[layer] = found
    return out


def compute_anchors(model, tok, requests: Sequence[dict], hparams, construction,
                    context_templates: Optional[List[List[str]]] = None,
                    progress: bool = False) -> Dict[int, AnchorResult]:
    """Only stage 2 of :func:`compute_edit`: the anchors an edit of ``requests`` by ``construction``
    would optimize, through the same set-up (requests, context templates; no covariance
    statistics, which no anchor reads), so they land in the anchor disk cache under the
    keys an edit looks up. For filling
    an anchor bank ahead of the edits, e.g. in several processes on disjoint requests
    (``easyedit-replay anchors bank``). The model is not changed.

    Args: as :func:`compute_edit` (spread needs the ``l_n`` anchor, replay the ``l_1``
    one, BLUE both).

    Returns:
        ``{anchor layer: AnchorResult}`` (``delta [S, R, d]`` float32, ``R`` requests).

    Raises:
        HyperParamsError, RequestError, NumericalError, as :func:`compute_edit`.
    """
    setup = _setup(model, tok, requests, hparams, construction, context_templates, progress, None, None,
                   statistics=False)
    return _anchors(model, tok, hparams, setup, None, progress)


def _hidden_reads(model, tok, probes, hparams) -> Dict[int, torch.Tensor]:
    """``{layer: [R, d] float32}`` block outputs at the lookup token for every edit layer."""
    names = {l: hparams.layer_module_tmp.format(l) for l in hparams.layers}
    reads = read_at_lookup(model, tok, probes, outputs=list(names.values()))
    return {l: reads["out:" + n].float().cpu() for l, n in names.items()}


@dataclass
class _EditLoop:
    """Stage 4 of :func:`compute_edit`, shared by every site: the probes (``key_probes``: each
    request in each context template; ``now_probes``: the bare prompts), the original weights,
    and what the sites produce (``updates`` by weight name, ``residuals`` by (layer, target
    template), ``[R, d]`` float32). With re-keyed protection the earlier edits' key probes
    join each site's read (:meth:`~easyedit_replay.sequential.SequentialContext.reread_probes`)."""

    model: Any
    tok: Any
    hparams: Any
    setup: _Setup
    targets: Targets
    key_probes: list
    now_probes: list
    originals: Dict[str, torch.Tensor]
    memory: Optional["_Memory"] = None
    updates: Dict[str, torch.Tensor] = field(default_factory=dict)
    residuals: Dict[Tuple[int, str], torch.Tensor] = field(default_factory=dict)


@dataclass
class _Memory:
    """``sequential_refresh``: the earlier edits a batch's solves restore
    (:mod:`easyedit_replay.sequential`). ``targets`` hold the states they reached right
    after their own batch, under this batch's construction (its share and measure
    layer); their key probes (each earlier request in this batch's context templates)
    and bare-prompt probes join every site's forward pass, and their keys and local
    residuals join the rule's rows."""

    targets: Targets
    key_probes: list
    now_probes: list

    @property
    def probes(self) -> list:
        return self.key_probes + self.now_probes

    def rows(self, step: int, site, reads: Dict[str, torch.Tensor], rewrite: str, target_module: str, templates):
        """``([R_old, d_in] keys, [R_old, d_out] local residual, [R_old, d] rewrite output
        or None)`` of the earlier edits at ``step``, from ``reads`` (the site's forward
        pass, sliced to this memory's probes)."""
        n = len(self.key_probes)
        keys = average_over_templates(reads["in:" + rewrite][:n], templates)
        error = self.targets.local_error(step, site.target, reads["out:" + target_module][n:])
        written = reads["out:" + rewrite][n:] if "out:" + rewrite in reads else None
        return keys, error, written


def _memory(model, tok, hparams, setup: _Setup, targets: Targets) -> Optional[_Memory]:
    """The earlier edits to restore (``sequential_refresh``), or None (off, or no earlier
    batch): ``targets`` with the values replaced by the states the earlier requests
    reached at every edit layer right after their own batch.

    Raises:
        HyperParamsError: PMET or any rule whose targets are not block outputs, a
            construction with a per-request share (``replay_capacity``,
            ``replay_joint``), or an earlier batch without stored states.
    """
    seq = setup.sequential
    if seq is None or not seq.refresh:
        return None
    check_construction(setup.rule, hparams, setup.construction)
    held = seq.earlier_states(targets.edit_layers)
    if held is None:
        return None
    requests, states = held
    template = hparams.layer_module_tmp
    values = {(layer, template): h.to(device=targets.values[next(iter(targets.values))].device)
              for layer, h in states.items()}
    restored = dataclasses.replace(targets, values=values, capacity=None, info={})
    return _Memory(restored, template_probes(tok, requests, setup.templates, hparams.fact_token),
                   bare_probes(tok, requests, hparams.fact_token))


def check_construction(rule: Algorithm, hparams, construction: Construction) -> None:
    """Refuse a construction the update rule cannot run with ``hparams``, from the
    hyperparameters alone (no model): the construction's own refusal (``replay_joint``
    refuses PMET) and the limits of ``sequential_refresh`` and its weight (the rule's
    :meth:`~easyedit_replay.algorithms.base.Algorithm.refresh_weight_refusal`).
    :func:`compute_edit` checks it, and ``compare``/``scale`` for every algorithm and mode
    before the model loads.

    Raises:
        HyperParamsError: naming ``alg_name``, ``sequential_refresh`` or
            ``sequential_refresh_weight`` and the fix.
    """
    refusal = construction.refusal(rule, hparams)
    if refusal:
        raise HyperParamsError(f"alg_name {hparams.alg_name}: {refusal}")
    if not hparams.sequential_refresh:
        return
    if any(s.target.template != hparams.layer_module_tmp for s in rule.sites(hparams)):
        raise HyperParamsError(f"sequential_refresh restores block-output states (layer_module_tmp); "
                               f"{rule.name}'s targets are module outputs. Use it with MEMIT, EMMET or AlphaEdit")
    if construction.share.per_request:
        raise HyperParamsError(f"sequential_refresh: {construction.name} sizes each request's share from "
                               f"its own capacity; use it with spread, replay, replay_remaining or replay_tau")
    if hparams.sequential_refresh_weight != 1:
        refusal = rule.refresh_weight_refusal(hparams)
        if refusal:
            raise HyperParamsError(f"sequential_refresh_weight = {hparams.sequential_refresh_weight!r} with "
                                   f"{rule.name}: {refusal}")


def _weigh_rows(rows: torch.Tensor, last: int, weight: float) -> torch.Tensor:
    """``rows`` ``[m, d]`` with its ``last`` rows multiplied by ``sqrt(weight)`` (in float64,
    cast back to ``rows``' dtype): the earlier edits' keys and residuals of a
    ``sequential_refresh`` solve, so its normal equations weigh them ``weight`` times."""
    scale = torch.ones(rows.shape[0], 1, dtype=torch.float64, device=rows.device)
    scale[rows.shape[0] - last:] = math.sqrt(weight)
    return (rows.double() * scale).to(rows.dtype)


def _edit_site(loop: _EditLoop, step: int, layer: int, si: int, site) -> LayerRecord:
    """One rewritten site of edit layer ``layer`` (``step``-th edited): keys ``[R, d_in]`` (mean
    over context templates) and the current state ``[R, d_out]`` at the measure layer in one
    forward pass -> residual (the construction's local error / divisor) -> the rule's update
    -> write ``W = W_orig + update`` (in the weight's dtype). With ``sequential_refresh`` the
    earlier edits' keys and residuals are the last rows of the solve, multiplied by
    ``sqrt(sequential_refresh_weight)`` when that weight is not 1 (:func:`_weigh_rows`). Stores the update and the
    residual in ``loop``; returns the site's diagnostics.

    Raises:
        NumericalError: non-finite keys, residual or update (the caller restores the weights).
    """
    setup, targets = loop.setup, loop.targets
    rewrite = site.rewrite_template.format(layer)
    wname = f"{rewrite}.weight"
    measure = targets.measure_layer(step)
    target_module = site.target.template.format(measure)
    n_keys, n_now = len(loop.key_probes), len(loop.now_probes)
    post = setup.post_norms.get(layer) if site.target.template == loop.hparams.layer_module_tmp else None
    earlier = setup.sequential.reread_probes(loop.tok, wname) if setup.sequential else None
    n_old = len(earlier.probes) if earlier else 0
    memory = loop.memory.probes if loop.memory else []
    reads = read_at_lookup(loop.model, loop.tok,
                           loop.key_probes + loop.now_probes + (earlier.probes if earlier else []) + memory,
                           outputs=[target_module] + ([rewrite] if post is not None else []), inputs=[rewrite])
    keys = average_over_templates(reads["in:" + rewrite][:n_keys], setup.templates)  # [R, d_in]
    error = targets.local_error(step, site.target, reads["out:" + target_module][n_keys:n_keys + n_now])  # [R, d_out]
    _check_finite(keys, f"keys at {rewrite}")
    _check_finite(error, f"residual at layer {layer}")
    protected = None
    if setup.sequential is not None:
        reread = earlier.average(reads["in:" + rewrite][n_keys + n_now:n_keys + n_now + n_old]) if earlier else None
        protected = setup.sequential.protected(wname, reread)  # [d_in, d_in] or None
        if protected is not None:
            _check_finite(protected, f"protected earlier keys at {rewrite}")
        setup.sequential.keep_keys(wname, keys)
    solve_keys, solve_error, written, restored = keys, error, reads.get("out:" + rewrite), 0
    if loop.memory is not None:  # sequential_refresh: the earlier edits' rows join the solve
        rows = {name: reads[name][n_keys + n_now + n_old:] for name in reads}
        old_keys, old_error, old_written = loop.memory.rows(step, site, rows, rewrite, target_module, setup.templates)
        _check_finite(old_keys, f"restored earlier keys at {rewrite}")
        _check_finite(old_error, f"restored earlier residual at layer {layer}")
        solve_keys, solve_error = torch.cat([keys, old_keys]), torch.cat([error, old_error.to(error.dtype)])
        restored = old_keys.shape[0]
        if post is not None:
            written = torch.cat([written[n_keys:n_keys + n_now], old_written])
    elif post is not None:
        written = written[n_keys:n_keys + n_now]
    weight = setup.params[wname]
    rule_error, divisor = solve_error, targets.divisor(step, site.target)
    if post is not None:  # post-norm MLP: the block-output share becomes the change down_proj writes
        rule_error = post.rewrite_residual(targets.share_of(step, site.target, solve_error), written,
                                          loop.hparams.clamp_norm_factor)
        divisor = 1.0
        _check_finite(rule_error, f"post-norm residual at layer {layer}")
    if restored and loop.hparams.sequential_refresh_weight != 1:  # weighted rows: w K_old K_old^T, w R_old K_old^T
        solve_keys, rule_error = (_weigh_rows(t, restored, loop.hparams.sequential_refresh_weight)
                                  for t in (solve_keys, rule_error))
    upd = setup.rule.update(UpdateInputs(
        step=step, layer=layer, site_index=si, weight_name=wname, keys=solve_keys.T, error=rule_error.T,
        divisor=divisor, cov=setup.covs[rewrite], hparams=loop.hparams, state=setup.state, device=weight.device,
        protected=protected, restored=restored,
    ))
    upd = match_shape(upd, weight.shape, wname)
    _check_finite(upd, f"update of {wname}")
    with torch.no_grad():
        orig = loop.originals[wname]
        weight.copy_((orig.to(device=upd.device, dtype=upd.dtype) + upd).to(weight.dtype))
    loop.updates[wname] = upd.detach()
    residual = targets.share_of(step, site.target, error)
    loop.residuals[(layer, site.target.template)] = residual.float()
    record = LayerRecord(step, layer, wname, measure, float(error.float().norm(dim=-1).mean()),
                         float(residual.norm(dim=-1).mean()), float(upd.norm()))
    log.debug("layer %d %s: |error| %.3f |upd| %.3f", layer, wname, record.error_norm, record.update_norm)
    return record


@in_float32_window  # half-precision models: the edit window runs in float32 (precision.py)
def compute_edit(
    model,
    tok,
    requests: Sequence[dict],
    hparams,
    construction,
    context_templates: Optional[List[List[str]]] = None,
    progress: bool = False,
    stats_dir=None,
    anchor=None,
    options: Optional[Dict[str, Any]] = None,
) -> EditPlan:
    """Compute the weight updates of one batch edit; the model is left unchanged.

    Stages: set-up (requests, templates, statistics, rule state, the model's
    sequential record) -> anchors (one per anchor layer of the construction) ->
    targets (norm-anchored with ``norm_anchor``) -> the layer loop (for each edited
    layer, first to last, and each rewritten site: keys and current state in one
    forward pass -> residual -> update rule -> write; then the trajectory read) ->
    the rule's finalize. Every touched weight is restored at the end.

    Args:
        requests: EasyEdit request dicts (``prompt``, ``subject``, ``target_new``, ...).
        hparams: a plugin hyperparameter dataclass (the base of ``alg_name`` picks the
            update rule; its construction suffix is not read here).
        construction: the target construction, a
            :class:`~easyedit_replay.targets.Construction` or its name or spec
            (``"replay"``, ``"spread"``, ``"blue"``, ``"replay_tau=0.25"``, ...); the
            parameters it leaves open are read from their YAML keys (``replay_tau``,
            ``replay_share``). :func:`apply_edit` (every EasyEdit entry point) passes the
            ``alg_name``'s.
        context_templates: inject templates (default: sampled, seeded, cached).
        options: extra keyword arguments of the ``apply_*`` call, handed to the
            algorithm's ``prepare`` (e.g. AlphaEdit's ``reset_cache``) and to
            :func:`easyedit_replay.sequential.prepare` (``sequential_edit``, ``reset_cache``).
        anchor: reuse anchors optimized earlier on the same weights for the same
            requests and templates: one :class:`AnchorResult` or ``{layer: AnchorResult}``
            (BLUE reuses replay's ``l_1`` anchor and spreading's ``l_n`` anchor).

    Returns:
        :class:`EditPlan` with ``updates[weight_name]`` shaped like the weight
        (float64 for MEMIT/EMMET/PMET, float32 for AlphaEdit).

    Raises:
        HyperParamsError, RequestError, NumericalError, StatisticsError. Whatever
        is raised, every weight is bit-identical to before.
    """
    started = time.perf_counter()
    setup = _setup(model, tok, requests, hparams, construction, context_templates, progress, stats_dir, options)
    rule, reqs, templates, sites = setup.rule, setup.requests, setup.templates, setup.sites
    check_construction(rule, hparams, setup.construction)
    anchors = _anchors(model, tok, hparams, setup, anchor, progress)
    targets = build_targets(model, tok, reqs, hparams, anchors, setup.construction, [s.target for s in sites],
                            setup.anchor_templates, rule.sqrt_share)
    setup.sequential.adjust_targets(model, tok, hparams, targets, sites)  # norm_anchor (NAS); else nothing
    for key, value in targets.values.items():
        _check_finite(value, f"target at layer {key[0]} ({key[1]})")
    memory = _memory(model, tok, hparams, setup, targets)  # sequential_refresh: earlier edits restored; else None

    key_probes = template_probes(tok, reqs, templates, hparams.fact_token)
    now_probes = bare_probes(tok, reqs, hparams.fact_token)
    layers = list(hparams.layers)
    setup.construction.share.prepare(ShareContext(model, tok, hparams, rule, sites, reqs, templates, setup.covs,
                                                  setup.state, key_probes, targets))  # capacities, joint plan
    site_names = {(l, s.target.template): s.target.template.format(l) for l in layers for s in sites}
    reads = read_at_lookup(model, tok, now_probes, outputs=list(site_names.values()))
    unedited = {key: reads["out:" + name].float() for key, name in site_names.items()}
    trajectory = Trajectory(
        layers[-1],
        final_hidden_target(model, tok, reqs, hparams, anchors, setup.construction, setup.anchor_templates).float().cpu(),
        _hidden_reads(model, tok, now_probes, hparams),
    )
    with weight_transaction(setup.params, restore_always=True) as originals:
        loop = _EditLoop(model, tok, hparams, setup, targets, key_probes, now_probes, originals, memory)
        records = []
        for step, layer in enumerate(targets.edit_layers):
            for si, site in enumerate(sites):
                records.append(_edit_site(loop, step, layer, si, site))
            trajectory.after[layer] = _hidden_reads(model, tok, now_probes, hparams)
        if setup.sequential is not None:  # sequential_refresh: the states this batch's edits reach
            setup.sequential.keep_states(trajectory.after[targets.edit_layers[-1]])
        pending = rule.finalize(model, tok, hparams, setup.state,
                                dict(requests=reqs, templates=templates, sequential=setup.sequential))
    return EditPlan(f"{rule.name}_{setup.construction.suffix}", setup.construction.name, reqs, templates, anchors,
                    targets, loop.updates, records, pending, time.perf_counter() - started, unedited, loop.residuals,
                    trajectory, setup.sequential)


class WeightsCopy(dict):
    """EasyEdit's ``weights_copy`` (``{weight_name: original tensor}``, empty unless
    ``return_orig_weights``) with the applied :class:`EditPlan` as ``.plan``.

    EasyEdit's ``BaseEditor.edit``/``batch_edit`` hand the ``weights_copy`` of
    ``apply_algo`` back to their caller unchanged (``metrics, model, weights_copy``), so
    an EasyEdit caller reaches the plan as ``weights_copy.plan``; to EasyEdit's own
    restore (``for k, v in weights_copy.items()``) it is a plain dict.
    """

    def __init__(self, plan: EditPlan, weights: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__(weights or {})
        self.plan = plan


def apply_plan(model, plan: EditPlan, hparams, return_orig_weights: bool = False) -> WeightsCopy:
    """Add ``plan.updates`` to the weights of ``model`` (as EasyEdit's ``apply_*_to_model``
    do) and commit the rule's pending state (AlphaEdit's key cache) and the batch's entry
    in the model's sequential record (:mod:`easyedit_replay.sequential`), in a transaction.

    Returns:
        :class:`WeightsCopy`: ``{weight_name: original tensor}`` when ``return_orig_weights``
        (else empty), with ``.plan``.

    Raises:
        whatever the rule's commit raises; every weight is then bit-identical to before.
    """
    weights_copy = WeightsCopy(plan)
    params = {n: resolve_parameter(model, n) for n in plan.updates}
    with weight_transaction(params):
        with torch.no_grad():
            for name, upd in plan.updates.items():
                w = params[name]
                if return_orig_weights and name not in weights_copy:
                    weights_copy[name] = w.detach().clone()
                if w.dtype in HALF_DTYPES:  # one rounding to the weight dtype: round(W + dW) (precision.py)
                    w.copy_((w.to(upd.dtype) + upd.to(w.device)).to(w.dtype))
                else:  # EasyEdit's apply_*_to_model
                    w[...] += upd.to(device=w.device, dtype=w.dtype)
        get_algorithm(hparams.alg_name).rule.commit(model, hparams, plan.pending)
        sequential.commit(model, plan.sequential)
    return weights_copy


def apply_edit(
    model,
    tok,
    requests: Sequence[dict],
    hparams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    keep_original_weight: bool = False,
    context_templates=None,
    progress: bool = False,
    anchor=None,
    **kwargs,
) -> Tuple[Any, WeightsCopy]:
    """EasyEdit's ``apply_*_to_model`` contract for every plugin algorithm: the EasyEdit
    boundary, where ``hparams.alg_name`` is decoded into the update rule and the target
    construction (``MEMIT_REPLAY``: MEMIT, replay), once, for :func:`compute_edit`.

    Returns ``(model, weights_copy)``: ``weights_copy`` (a :class:`WeightsCopy`) maps each
    rewritten parameter name to its original tensor when ``return_orig_weights`` is true
    (empty otherwise), and carries the applied :class:`EditPlan` as ``weights_copy.plan``.
    With ``copy=True`` a deep copy is edited and the input model is untouched. Any
    exception leaves every weight bit-identical to before.
    ``cache_template`` (EasyEdit's per-case anchor cache) is accepted for signature
    compatibility and not used. ``anchor`` reuses an anchor optimized earlier on the
    same unedited weights (see :func:`compute_edit`); the applied plan's anchor is
    ``weights_copy.plan.anchor``.
    """
    if copy:
        model = deepcopy(model)
    construction = get_algorithm(hparams.alg_name).construction
    plan = compute_edit(model, tok, requests, hparams, construction, context_templates=context_templates,
                        progress=progress, anchor=anchor, options=kwargs)
    return model, apply_plan(model, plan, hparams, return_orig_weights=return_orig_weights)
