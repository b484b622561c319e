"""Target accuracy: how close each edit layer gets to the state it was asked to reach.

After an edit, for every edit layer ``l_i`` (and every target site) and every
request, the edited model is run on the bare prompt and its state ``h^{l_i}`` at
the lookup token is compared with that layer's target ``t^{l_i}``:

    relative error = |h^{l_i} - t^{l_i}| / |t^{l_i}|

Targets (docs/method.md, "Diagnostics"):

- replay, BLUE, OneLayer (constructions that measure each layer at itself): the
  layer's own target, ``t^{l_i} = z^{l_i}`` (replay: the replayed state, the
  anchor itself at ``l_1``; BLUE: the anchors at ``l_1`` and ``l_n``).
- spread (and spreading without dividing): the implicit per-layer target of backward spreading. Layer ``l_i`` was
  asked to add the residual ``r_i`` to its output, on the assumption that what it
  adds reaches later layers unchanged; so the state it aims at, together with the
  layers before it, is ``t^{l_i} = h_0^{l_i} + sum_{j <= i} r_j`` (``h_0`` = the
  unedited model's state). At the last edit layer the target is the anchor ``z``
  itself (with the stock share ``r_n`` closes the remaining gap to ``z``).

The last edit layer's row is the error against the anchor-derived final target
(``z`` for spreading, ``z^{l_n}`` for replay). Also reported: the NLL of
``target_new`` that the optimized anchor achieved and the NLL the edited model
achieves on the same rewriting prompts (how much of the optimized effect the
weight update realizes).

The paper's section-4 analyses (:func:`residual_ratios`, :func:`passive_cosines`)
read the residual stream at the lookup token along the layer-by-layer edit
(:class:`~easyedit_replay.editor.Trajectory`):

- residual ratio after editing layer ``l`` (Tables 2 and 5):
  ``|m_L - h_L(after l)| / |m_L - h_L(unedited)|`` with ``m_L`` the construction's
  final target at ``l_n`` (spreading's anchor, replay's replayed ``z^{l_n}``,
  BLUE's anchor at ``l_n``);
- passive cosine of layer ``l`` (Table 1): the cosine between the change that
  layer ``l``'s own update makes to its output, ``dm_l = h_l(after l) - h_l(before
  l)``, and the change it causes at ``l_n``, ``h_L(after l) - h_L(before l)``
  (1 at ``l_n`` itself by definition).

For sequential editing (``scale --sequential`` records them in every step cell):

- :func:`norm_report`: the anchor's ``|delta|`` and ``|z|`` and each edited layer's
  target norm, relative to the unedited model's mean output norm of that module
  (:func:`output_norms`);
- :func:`restore_attribution`: an earlier batch's efficacy now, with every edited
  weight set back to its value right after that batch, and with each one alone set
  back (the key drift itself is :func:`easyedit_replay.sequential.key_drift`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from .anchors import target_nll
from .reads import bare_probes, read_at_lookup


@dataclass
class TargetAccuracy:
    """Per-layer target errors of one edit (one target site).

    ``relative_error`` is ``[n_layers, R]``; ``anchor_nll``/``edited_nll`` are ``[R]``.
    """

    mode: str
    site: str
    layers: List[int]
    relative_error: torch.Tensor
    anchor_nll: torch.Tensor
    edited_nll: torch.Tensor

    def mean_by_layer(self) -> List[float]:
        """``[n_layers]``: :attr:`relative_error` ``[n_layers, R]`` averaged over requests."""
        return [float(x) for x in self.relative_error.mean(1)]

    def to_dict(self) -> Dict:
        """JSON-ready lists: the fields, ``mean_by_layer`` and ``final_error`` (the last
        layer's ``[R]`` row of :attr:`relative_error`)."""
        return {
            "mode": self.mode, "site": self.site, "layers": self.layers,
            "relative_error": self.relative_error.tolist(),
            "mean_by_layer": self.mean_by_layer(),
            "final_error": self.relative_error[-1].tolist(),
            "anchor_nll": self.anchor_nll.tolist(), "edited_nll": self.edited_nll.tolist(),
        }


def layer_targets(plan, site_template: str) -> Dict[int, torch.Tensor]:
    """``{layer: [R, d]}`` targets of every edit layer (see the module docstring)."""
    layers = plan.targets.edit_layers
    if plan.targets.construction.measure == "own":
        return {l: plan.targets.values[(l, site_template)].float() for l in layers}
    out, total = {}, None
    for layer in layers[:-1]:
        r = plan.residuals[(layer, site_template)]
        total = r if total is None else total + r
        out[layer] = plan.unedited[(layer, site_template)] + total
    out[layers[-1]] = plan.targets.values[(layers[-1], site_template)].float()
    return out


def target_accuracy(model, tok, plan, hparams) -> List[TargetAccuracy]:
    """Measure target accuracy of ``plan`` on ``model`` (which must carry the edit).

    Returns one :class:`TargetAccuracy` per target site (MEMIT-style: one).
    """
    probes = bare_probes(tok, plan.requests, hparams.fact_token)
    sites = sorted({tmp for (_, tmp) in plan.targets.values})
    layers = list(plan.targets.edit_layers)
    names = {(l, s): s.format(l) for l in layers for s in sites}
    reads = read_at_lookup(model, tok, probes, outputs=list(names.values()))
    edited_nll = target_nll(model, tok, plan.requests, hparams, plan.templates)
    out = []
    for site in sites:
        targets = layer_targets(plan, site)
        errors = []
        for layer in layers:
            h = reads["out:" + names[(layer, site)]].float().cpu()
            t = targets[layer].float().cpu()
            errors.append((h - t).norm(dim=-1) / t.norm(dim=-1))
        out.append(TargetAccuracy(plan.mode, site, layers, torch.stack(errors),
                                  plan.anchor.nll.float().cpu(), edited_nll.float().cpu()))
    return out


def residual_ratios(plan) -> Dict[int, torch.Tensor]:
    """``{edited layer: [R]}`` ratio of the final-layer residual left after editing that
    layer (and the ones before it): ``|m_L - h_L(after l)| / |m_L - h_L(unedited)|``.

    Source: the paper's Tables 2 and 5 (section 4); ``m_L`` is
    ``plan.trajectory.final_target``. A ratio above 1 means the edit moved ``h_L``
    away from its target. A request whose target is its unedited state (its anchor
    needed no change, ``|m_L - h_L(unedited)| = 0``) has no ratio: NaN, which the
    statistics drop, not ``inf``.
    """
    t = plan.trajectory
    gap0 = (t.final_target - t.unedited[t.final_layer]).norm(dim=-1)
    return {l: torch.where(gap0 > 0, (t.final_target - after[t.final_layer]).norm(dim=-1) / gap0,
                           torch.full_like(gap0, float("nan")))
            for l, after in t.after.items()}


def passive_cosines(plan) -> Dict[int, torch.Tensor]:
    """``{edited layer: [R]}`` cosine between a layer's own output change ``dm_l`` at the
    lookup token and the change it causes at ``l_n`` (the paper's Table 1; the
    spreading assumption says 1)."""
    t = plan.trajectory
    prev = t.unedited
    out = {}
    for layer, after in t.after.items():
        own = after[layer] - prev[layer]
        passive = after[t.final_layer] - prev[t.final_layer]
        out[layer] = torch.nn.functional.cosine_similarity(own, passive, dim=-1)
        prev = after
    return out


def update_agreement(updates: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, float]]:
    """How closely each weight update of one edit matches the same edit computed another way
    (e.g. a bf16 model against float32, a dispatched model against a plain one).

    Args:
        updates, reference: ``{weight_name: update}`` (any shapes, equal per name; any
            dtype or device).

    Returns:
        ``{weight_name: {"cosine", "rel_diff", "rel_to_largest", "norm", "ref_norm"}}`` with
        ``cosine`` of the flattened updates, ``rel_diff = |u - r| / |r|`` and
        ``rel_to_largest = |u - r| / max_w |r_w|`` (Frobenius norms; the largest reference
        update of the edit: a late replay layer's update can be 1% of the first layer's,
        and its own relative difference then measures rounding, not the edit), float64.

    Raises:
        KeyError: ``updates`` lacks a weight of ``reference``.
    """
    pairs = {name: (updates[name].detach().double().cpu().flatten(), ref.detach().double().cpu().flatten())
             for name, ref in reference.items()}
    largest = max(float(r.norm()) for _, r in pairs.values())
    out = {}
    for name, (u, r) in pairs.items():
        diff = float((u - r).norm())
        out[name] = {"cosine": float(torch.nn.functional.cosine_similarity(u, r, dim=0)),
                     "rel_diff": diff / float(r.norm()), "rel_to_largest": diff / largest,
                     "norm": float(u.norm()), "ref_norm": float(r.norm())}
    return out


# ----------------------------------------------------------------------------- sequential editing


def norm_modules(hparams) -> List[str]:
    """The modules whose outputs :func:`norm_report` measures: every edit layer's anchor
    sites (``Algorithm.anchor_templates``) and target sites (the rule's ``sites``)."""
    from .algorithms import get_algorithm

    rule = get_algorithm(hparams.alg_name).rule
    templates = list(rule.anchor_templates(hparams)) + [s.target.template for s in rule.sites(hparams)]
    return list(dict.fromkeys(t.format(l) for l in hparams.layers for t in templates))


def output_norms(model, tok, requests, hparams, modules: List[str]) -> Dict[str, float]:
    """``{module: mean |output|}`` at the lookup token of the bare prompts of ``requests``
    (EasyEdit request dicts or :class:`~easyedit_replay.prompts.EditRequest`), one batched
    forward pass: on the unedited model, the reference :func:`norm_report` divides by."""
    from .prompts import prepare_requests

    reqs = prepare_requests([r.raw if hasattr(r, "raw") else r for r in requests])
    reads = read_at_lookup(model, tok, bare_probes(tok, reqs, hparams.fact_token), outputs=modules)
    return {m: float(reads["out:" + m].float().norm(dim=-1).mean()) for m in modules}


def norm_report(plan, reference: Dict[str, float]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Norms of one edit's anchors and targets, relative to ``reference`` (the unedited
    model's mean output norm of each module, :func:`output_norms`).

    Returns:
        ``{"anchor": {module: {"delta", "delta_max", "z", "z_max"}}, "targets": {module:
        {"norm", "max"}}, "reference": {module: mean |h|}}``: means (and maxima) over the
        batch's requests of ``|delta| / ref`` and ``|z| / ref`` at each anchor site, and of
        ``|t| / ref`` for the target ``t`` of every edited layer (:func:`layer_targets`:
        spreading's implicit per-layer targets; the replayed ones; norm-anchored targets
        as the edit used them).

    Raises:
        KeyError: ``reference`` lacks a module of the plan (see :func:`norm_modules`).
    """
    out: Dict[str, Dict[str, Dict[str, float]]] = {"anchor": {}, "targets": {}, "reference": {}}
    for layer, anchor in sorted(plan.anchors.items()):
        for s, module in enumerate(anchor.sites):
            ref = reference[module]
            delta = anchor.delta[s].float().norm(dim=-1) / ref
            z = anchor.value[s].float().norm(dim=-1) / ref
            out["anchor"][module] = {"delta": float(delta.mean()), "delta_max": float(delta.max()),
                                     "z": float(z.mean()), "z_max": float(z.max())}
            out["reference"][module] = ref
    for template in sorted({t for _, t in plan.targets.values}):
        for layer, target in layer_targets(plan, template).items():
            module = template.format(layer)
            norm = target.float().cpu().norm(dim=-1) / reference[module]
            out["targets"][module] = {"norm": float(norm.mean()), "max": float(norm.max())}
            out["reference"][module] = reference[module]
    return out


def efficacy_means(model, tok, records) -> Dict[str, float]:
    """Means over ``records`` (canonical records) of ``efficacy_exact``, ``efficacy_win``
    and ``logp_new`` (:func:`~easyedit_replay.evaluate.evaluate_records` on the edit prompt
    alone)."""
    from .evaluate import evaluate_records

    rows = evaluate_records(model, tok, [{k: r.get(k) for k in ("prompt", "target_new", "ground_truth")}
                                         for r in records]).rows
    out = {}
    for key in ("efficacy_exact", "efficacy_win", "logp_new"):
        values = [row[key] for row in rows if row[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def restore_attribution(model, tok, batches: Dict[int, list], snapshots: Dict[int, Dict[str, torch.Tensor]],
                        params: Dict[str, torch.nn.Parameter]) -> Dict[str, dict]:
    """Where an earlier batch's efficacy went: for each batch ``j`` of ``batches`` (its
    records), its efficacy now, with every edited weight set back to its value right
    after batch ``j`` (the model as batch ``j`` left it), and with each edited weight
    alone set back (that layer's value no longer overwritten by the later batches, and
    the keys after it no longer moved by that layer's later updates). The weights are
    restored bit-identically after each reading.

    Args:
        batches: ``{j: records of batch j}``.
        snapshots: ``{j: {weight name: tensor right after batch j}}`` for every ``j``.
        params: ``{weight name: parameter}`` of the edited weights.

    Returns:
        ``{str(j): {"now": eff, "after_batch": eff, "restored": {weight name: eff}}}`` with
        ``eff`` the :func:`efficacy_means` of batch ``j``'s records.

    Raises:
        KeyError: a batch without a snapshot, or a snapshot of a weight not in ``params``.
    """
    from .editor import weight_transaction

    def set_back(names, j):
        with torch.no_grad():
            for name in names:
                params[name].copy_(snapshots[j][name])

    out = {}
    for j, records in sorted(batches.items()):
        entry = {"now": efficacy_means(model, tok, records), "restored": {}}
        with weight_transaction(params, restore_always=True):
            set_back(snapshots[j], j)
            entry["after_batch"] = efficacy_means(model, tok, records)
        for name in snapshots[j]:
            with weight_transaction(params, restore_always=True):
                set_back([name], j)
                entry["restored"][name] = efficacy_means(model, tok, records)
        out[str(j)] = entry
    return out
