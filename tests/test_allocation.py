"""Sharing an edit across layers with replayed targets (issue 16): the ``replay_tau``
and ``replay_capacity`` constructions, on the real SmolLM2 with short anchor
optimizations.

- ``replay_tau`` with tau = 0 is bit-identical to ``replay`` and with tau = 1 to
  ``replay_remaining`` (MEMIT, and PMET with its sqrt share);
- each rule's capacity ``q`` predicts what its own solve realizes for one key,
  ``dW k = r q / (1 + q)`` (MEMIT, EMMET, AlphaEdit), so the share formula rests on
  the rule's real behaviour, not on an assumption;
- ``replay_capacity`` on one layer is ``replay`` / ``onelayer`` on that layer, its
  last share is 1 and its earlier shares are ``(1 + q_i) / (1 + Q_i)``;
- ``replay_joint`` (the joint solve through the Jacobians) equals a dense solve with
  Jacobians read one basis vector at a time, differs from the additive solution, and is
  replay on one layer;
- no rule optimizes an anchor of its own: replay's are read from the cache.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from easyedit_replay.algorithms import get_algorithm, load_hparams
from easyedit_replay.cli import default_hparams_path
from easyedit_replay.editor import compute_edit
from easyedit_replay.errors import HyperParamsError
from easyedit_replay.prompts import prepare_requests
from easyedit_replay.reads import average_over_templates, read_at_lookup, template_probes
from easyedit_replay.stats import second_moments
from easyedit_replay.targets import mode_spec, parse_mode

LAYERS = [4, 5, 6]
TEMPLATES = [["{}"], ["The following is true. {}"]]


def _hp(stats_dir, alg="MEMIT", **changes):
    fields = {"layers": LAYERS, "v_num_grad_steps": 2, "anchor_cache": False, **changes}
    return load_hparams(default_hparams_path(alg=f"{alg}_REPLAY"), stats_dir=stats_dir, **fields)


def _same_updates(a, b, what):
    assert a.updates.keys() == b.updates.keys(), what
    for name in a.updates:
        assert torch.equal(a.updates[name], b.updates[name]), f"{what}: {name}"


@pytest.fixture(scope="module")
def memit_plans(model_tok, stats_dir, demo_records_module):
    model, tok = model_tok
    hp = _hp(stats_dir)
    out, pool = {}, {}
    for name, mode, changes in [("replay", "replay", {}), ("replay_remaining", "replay_remaining", {}),
                                ("tau0", "replay_tau", {"replay_tau": 0.0}),
                                ("tau1", "replay_tau", {"replay_tau": 1.0}),
                                ("tau.5", "replay_tau", {"replay_tau": 0.5}),
                                ("capacity", "replay_capacity", {})]:
        out[name] = compute_edit(model, tok, demo_records_module, hp.replace(**changes), mode,
                                 context_templates=TEMPLATES, anchor=pool)
        pool.update(out[name].anchors)
    return hp, out


@pytest.fixture(scope="module")
def demo_records_module():
    from easyedit_replay.data import load_records

    return load_records(n=2)


def test_tau_endpoints_are_bit_identical_to_replay_and_replay_remaining(memit_plans):
    _, out = memit_plans
    _same_updates(out["tau0"], out["replay"], "tau=0 vs replay")
    _same_updates(out["tau1"], out["replay_remaining"], "tau=1 vs replay_remaining")
    # tau = 1/2: PMET's rule on replayed targets, the last layer takes its full residual
    divisors = [out["tau.5"].targets.divisor(i) for i in range(3)]
    assert divisors == [math.sqrt(3.0), math.sqrt(2.0), 1.0]
    # the tau-0.5 edit lies between FE and the divided share at the first layer
    first = "model.layers.4.mlp.down_proj.weight"
    norms = [out[k].updates[first].norm().item() for k in ("replay_remaining", "tau.5", "replay")]
    assert norms[0] < norms[1] < norms[2]


def test_pmet_tau_one_is_replay_remaining_with_its_sqrt_share(model_tok, stats_dir, demo_records_module):
    model, tok = model_tok
    hp = _hp(stats_dir, "PMET", v_num_grad_steps=1)
    recs = demo_records_module[:1]
    rem = compute_edit(model, tok, recs, hp, "replay_remaining", context_templates=TEMPLATES)
    tau = compute_edit(model, tok, recs, hp.replace(replay_tau=1.0), "replay_tau", context_templates=TEMPLATES,
                       anchor=rem.anchors)
    _same_updates(tau, rem, "PMET tau=1 vs replay_remaining")
    assert [tau.targets.divisor(i) for i in range(3)] == [math.sqrt(3.0), math.sqrt(2.0), 1.0]


def _keys_and_cov(model, tok, hp, recs, layer):
    reqs = prepare_requests(recs)
    module = hp.rewrite_module_tmp.format(layer)
    reads = read_at_lookup(model, tok, template_probes(tok, reqs, TEMPLATES, hp.fact_token), inputs=[module])
    keys = average_over_templates(reads["in:" + module], TEMPLATES)  # [R, d_in]
    cov = second_moments(model, tok, hp, [module])[module]
    return keys, cov, module


@pytest.mark.parametrize("alg", ["MEMIT", "EMMET", "AlphaEdit"])
def test_capacity_predicts_what_one_keys_solve_realizes(model_tok, stats_dir, demo_records_module, alg):
    """For one request on one layer, the rule's own update moves the layer's output at
    the key by ``q / (1 + q)`` of the residual it was given: ``dW k = r q / (1 + q)``."""
    model, tok = model_tok
    hp = _hp(stats_dir, alg, layers=[5], v_num_grad_steps=1)
    recs = demo_records_module[:1]
    plan = compute_edit(model, tok, recs, hp, "replay", context_templates=TEMPLATES)
    keys, cov, module = _keys_and_cov(model, tok, hp, recs, 5)
    rule = get_algorithm(hp.alg_name).rule
    state = rule.prepare(model, tok, hp, {module: cov}, {"stats_dir": stats_dir, "reset_cache": True})
    q = rule.capacity(keys.T, cov, hp, state, f"{module}.weight")
    assert q.shape == (1,) and float(q) > 0
    upd = plan.updates[f"{module}.weight"].double()  # [d_out, d_in]
    realized = upd @ keys[0].double()
    resid = plan.residuals[(5, hp.layer_module_tmp)][0].double()
    expect = resid * float(q / (1 + q))
    assert torch.allclose(realized, expect, rtol=1e-3, atol=1e-4 * resid.norm().item()), \
        f"{alg}: realized {realized.norm():.4f} vs q/(1+q) r {expect.norm():.4f}"
    # and it is a real fraction, neither 0 nor the whole residual, on this model
    assert 0.05 < float(q / (1 + q)) < 0.999


def test_capacity_shares(memit_plans, model_tok, stats_dir, demo_records_module):
    hp, out = memit_plans
    model, tok = model_tok
    plan = out["capacity"]
    t = plan.targets
    site = t.sites[0]
    q = {layer: t.capacity[(layer, site.template)].double() for layer in LAYERS}
    # the capacities are the rule's on independently read keys
    keys, cov, module = _keys_and_cov(model, tok, hp, demo_records_module, 4)
    assert torch.allclose(q[4], get_algorithm("MEMIT_REPLAY").rule.capacity(keys.T, cov, hp, {}, module), rtol=1e-6)
    for i, layer in enumerate(LAYERS):
        expect = (1 + sum(q[l] for l in LAYERS[i:])) / (1 + q[layer])
        assert torch.allclose(t.divisor(i, site).double(), expect, rtol=1e-6), layer
    assert torch.equal(t.divisor(2, site), torch.ones(2))  # the last layer takes its full remaining residual
    assert all(float(d.min()) > 1 for d in (t.divisor(0, site), t.divisor(1, site)))  # earlier layers share
    # residuals recorded per request are the local errors divided row by row
    rec = plan.residuals[(4, site.template)]
    full = out["replay"].residuals[(4, site.template)]  # the same anchor and state at l_1
    assert torch.allclose(rec, (full.double() / t.divisor(0, site).double()[:, None]).float(), rtol=1e-5)


def test_capacity_on_one_layer_is_replay_and_onelayer(model_tok, stats_dir, demo_records_module):
    model, tok = model_tok
    hp = _hp(stats_dir, layers=[6])
    replay = compute_edit(model, tok, demo_records_module, hp, "replay", context_templates=TEMPLATES)
    pool = dict(replay.anchors)
    for mode in ("replay_capacity", "replay_joint", "onelayer"):
        plan = compute_edit(model, tok, demo_records_module, hp, mode, context_templates=TEMPLATES, anchor=pool)
        _same_updates(plan, replay, f"{mode} on one layer")


def test_new_rules_reuse_replays_anchors_from_the_cache(model_tok, stats_dir, demo_records_module, tmp_path,
                                                        monkeypatch, caplog):
    model, tok = model_tok
    monkeypatch.setenv("EASYEDIT_REPLAY_ANCHOR_CACHE", str(tmp_path / "anchors"))
    hp = _hp(stats_dir, anchor_cache=True)
    replay = compute_edit(model, tok, demo_records_module, hp, "replay", context_templates=TEMPLATES)
    for mode, changes in [("replay_tau", {"replay_tau": 0.25}), ("replay_capacity", {}), ("replay_joint", {})]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="easyedit_replay.anchors"):
            plan = compute_edit(model, tok, demo_records_module, hp.replace(**changes), mode,
                                context_templates=TEMPLATES)
        assert "2 loaded from the cache, 0 optimized" in caplog.text, mode
        assert torch.equal(plan.anchors[4].delta, replay.anchors[4].delta), mode


def test_mode_specs_and_replay_tau_validation(stats_dir):
    assert mode_spec(" replay_tau=0.250") == "replay_tau=0.25"
    c, params = parse_mode("replay_tau=0")
    assert c.name == "replay_tau" and params == {"replay_tau": 0.0}
    with pytest.raises(ValueError, match="takes no parameter"):
        parse_mode("replay=0.5")
    with pytest.raises(ValueError, match="not a number"):
        parse_mode("replay_tau=half")
    with pytest.raises(ValueError, match="replay_capacity"):
        parse_mode("replay_share")
    with pytest.raises(HyperParamsError, match="replay_tau"):
        _hp(stats_dir, replay_tau=1.5)


def _dense_jacobians(model, tok, hp, req, layers):
    """``{l_j: [d, d]}`` ``d h^{l_n} / d h^{l_j}`` at the lookup token of one bare prompt,
    one row per basis vector: ``d`` copies of the prompt in one batch, row ``k`` pulls
    back ``e_k``."""
    from easyedit_replay.batching import pad_right, token_ids
    from easyedit_replay.prompts import lookup_index
    from easyedit_replay.tracing import Trace, add_at_positions, run

    width = model.config.hidden_size
    look = lookup_index(tok, req.prompt, req.subject, hp.fact_token)
    ids, mask = pad_right([token_ids(tok, req.text)[: look + 1]] * width, 0)
    rows, cols = torch.arange(width), torch.full((width,), look)
    out = {}
    for layer in layers[:-1]:
        delta = torch.zeros(width, width, requires_grad=True)
        edits = {hp.layer_module_tmp.format(layer): lambda h: add_at_positions(h, rows, cols, delta)}
        name = hp.layer_module_tmp.format(layers[-1])
        trace = Trace(model, outputs=[name], edits=edits, detach=False, stop_when_done=True)
        with torch.enable_grad():
            run(model, trace, input_ids=ids, attention_mask=mask)
            final = trace.outputs[name][rows, cols]
            (rows_of_j,) = torch.autograd.grad(final, [delta], grad_outputs=torch.eye(width))
        out[layer] = rows_of_j.double()  # row k: e_k^T J
    return out


def test_joint_solve_equals_a_dense_solve(memit_plans, model_tok, stats_dir, demo_records_module):
    """The conjugate-gradient plan == ``d_j = q_j J_j^T (I + sum_j q_j J_j J_j^T)^{-1} r``
    with every Jacobian read densely; and the Jacobians matter: the plan is not the
    additive (identity-Jacobian) solution ``q_j r / (1 + Q)``."""
    from easyedit_replay.targets.joint import joint_plan

    hp, out = memit_plans
    model, tok = model_tok
    replay = out["replay"]
    site = hp.layer_module_tmp
    q = {l: out["capacity"].targets.capacity[(l, site)] for l in LAYERS}
    z_last = replay.targets.values[(LAYERS[-1], site)]
    plan = joint_plan(model, tok, replay.requests, hp, z_last, q, LAYERS, site, tol=1e-6, max_iter=300)
    assert plan.relative_residual < 1e-4 and plan.iterations > 1
    for r, req in enumerate(replay.requests):
        jac = _dense_jacobians(model, tok, hp, req, LAYERS)
        resid = (z_last[r] - replay.unedited[(LAYERS[-1], site)][r]).double()
        qr = {l: float(q[l][r]) for l in LAYERS}
        m = (1 + qr[LAYERS[-1]]) * torch.eye(len(resid), dtype=torch.float64)
        for l, j in jac.items():
            m += qr[l] * j @ j.T
        mu = torch.linalg.solve(m, resid)
        additive = resid / (1 + sum(qr.values()))
        for l, j in jac.items():
            expect = qr[l] * j.T @ mu
            got = plan.deltas[l][r].double()
            assert float((got - expect).norm() / expect.norm()) < 1e-3, (r, l)
            assert float((got - qr[l] * additive).norm() / expect.norm()) > 0.05, (r, l)  # J is not I


def test_joint_edit_targets_the_planned_states(memit_plans, model_tok, stats_dir, demo_records_module):
    """``replay_joint`` targets the planned states at ``l_1..l_{n-1}`` and ``z^{l_n}`` at the
    last layer, asking each earlier layer for ``(1 + q) / q`` of its local residual."""
    hp, out = memit_plans
    model, tok = model_tok
    plan = compute_edit(model, tok, demo_records_module, hp, "replay_joint", context_templates=TEMPLATES,
                        anchor=dict(out["replay"].anchors))
    t, site = plan.targets, plan.targets.sites[0]
    last = (LAYERS[-1], site.template)
    assert torch.equal(t.values[last], out["replay"].targets.values[last])
    assert t.info["joint_iterations"] > 0 and t.info["joint_seconds"] > 0
    for i, layer in enumerate(LAYERS[:-1]):
        q = t.capacity[(layer, site.template)].double()
        assert torch.allclose(t.divisor(i, site).double(), q / (1 + q), rtol=1e-6)
        rec = plan.residuals[(layer, site.template)].double()
        assert float(rec.norm()) > 0
    assert t.divisor(len(LAYERS) - 1, site) == 1.0
    # the planned first-layer state is the unedited state plus the planned change
    first = (LAYERS[0], site.template)
    assert not torch.allclose(t.values[first], out["replay"].targets.values[first])


def test_joint_refuses_pmet(model_tok, stats_dir, demo_records_module):
    model, tok = model_tok
    hp = _hp(stats_dir, "PMET")
    with pytest.raises(HyperParamsError, match="replay_joint"):
        compute_edit(model, tok, demo_records_module, hp, "replay_joint", context_templates=TEMPLATES)


def test_joint_refuses_a_broken_solve_and_a_non_replay_registration(memit_plans, model_tok, demo_records_module,
                                                                    monkeypatch):
    """A solve that breaks down (NaN residual) is a NumericalError before any weight is
    written; a construction with share 'joint' must be a replay construction."""
    import dataclasses

    import easyedit_replay.targets.joint as joint
    from easyedit_replay.errors import NumericalError
    from easyedit_replay.targets import get_construction, register_construction

    hp, out = memit_plans
    model, tok = model_tok
    real = joint.joint_plan

    def broken(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan.relative_residual = float("nan")
        return plan

    monkeypatch.setattr(joint, "joint_plan", broken)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NumericalError, match="did not converge"):
        compute_edit(model, tok, demo_records_module, hp, "replay_joint", context_templates=TEMPLATES,
                     anchor=dict(out["replay"].anchors))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    spread_like = dataclasses.replace(get_construction("replay_joint"), name="joint_from_last", anchors=("last",),
                                      replay=False, measure="last")
    with pytest.raises(ValueError, match="share 'joint'"):
        register_construction(spread_like)


def test_joint_needs_finite_capacities(memit_plans, model_tok):
    """EMMET with emmet_lambda = 0 has an infinite capacity: a HyperParamsError naming the
    field, raised before any forward pass."""
    from easyedit_replay.targets.joint import joint_plan

    hp, out = memit_plans
    model, tok = model_tok
    q = {l: torch.ones(2) for l in LAYERS}
    q[LAYERS[1]] = torch.tensor([1.0, float("inf")])
    z_last = out["replay"].targets.values[(LAYERS[-1], hp.layer_module_tmp)]
    with pytest.raises(HyperParamsError, match="emmet_lambda"):
        joint_plan(model, tok, out["replay"].requests, hp, z_last, q, LAYERS, hp.layer_module_tmp)
