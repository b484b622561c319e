"""The paper's target constructions (spread, replay, replay_remaining, blue, onelayer,
nodiv), its metrics (Success, Accuracy, DKL, Top-k) and its analyses (residual
ratio, passive cosine), on the real SmolLM2 with short anchor optimizations."""

from __future__ import annotations

import math

import pytest
import torch

import easyedit_replay
from easyedit_replay.algorithms import algorithm_names, get_algorithm
from easyedit_replay.diagnostics import passive_cosines, residual_ratios
from easyedit_replay.editor import compute_edit
from easyedit_replay.errors import HyperParamsError
from easyedit_replay.evaluate import distribution_shift, evaluate_records, greedy_generate
from easyedit_replay.algorithms import load_hparams
from easyedit_replay.reads import bare_probes, read_at_lookup
from easyedit_replay.targets import CONSTRUCTIONS, get_construction

LAYERS = [4, 5, 6]


@pytest.fixture(scope="module")
def plans(model_tok, stats_dir):
    """Every construction on the same 2 demo edits, sharing anchors (2 steps)."""
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.data import load_records

    model, tok = model_tok
    hp = load_hparams(default_hparams_path(), stats_dir=stats_dir, layers=LAYERS, v_num_grad_steps=2)
    records = load_records(n=2)
    templates = [["{}"], ["The following is true. {}"]]
    pool, out = {}, {}
    for mode in CONSTRUCTIONS:
        out[mode] = compute_edit(model, tok, records, hp, mode, context_templates=templates, anchor=pool)
        pool.update(out[mode].anchors)
    return hp, records, templates, out


def test_every_construction_has_names_entry_points_and_hparams():
    for base in ("MEMIT", "PMET", "EMMET", "AlphaEdit"):
        for mode in CONSTRUCTIONS:
            name = f"{base}_{mode.upper()}"
            assert name in algorithm_names()
            reg = get_algorithm(name)
            assert reg.base == base and reg.mode == mode
            fn = getattr(easyedit_replay, f"apply_{name.lower()}_to_model")
            assert fn.__name__ == f"apply_{name.lower()}_to_model"
    with pytest.raises(HyperParamsError, match="MEMIT_BLUE"):
        get_algorithm("MEMIT_FORWARD")
    with pytest.raises(ValueError, match="onelayer"):
        get_construction("two-layer")


def test_layers_anchors_and_shares_of_each_construction(plans):
    hp, _, _, out = plans
    expect = {  # mode: (edited layers, anchor layers, divisors)
        "spread": (LAYERS, [6], [3.0, 2.0, 1.0]),
        "replay": (LAYERS, [4], [1.0, 1.0, 1.0]),  # the paper's method: full local residual
        "replay_remaining": (LAYERS, [4], [3.0, 2.0, 1.0]),
        "blue": ([4, 6], [4, 6], [1.0, 1.0]),
        "onelayer": ([6], [6], [1.0]),
        "nodiv": (LAYERS, [6], [1.0, 1.0, 1.0]),
    }
    for mode, (edited, anchored, divisors) in expect.items():
        plan = out[mode]
        assert plan.targets.edit_layers == edited, mode
        assert sorted(plan.anchors) == anchored, mode
        assert [plan.targets.divisor(i) for i in range(len(edited))] == divisors, mode
        assert sorted(plan.updates) == [f"model.layers.{l}.mlp.down_proj.weight" for l in edited], mode
    assert [r.measure_layer for r in out["spread"].records] == [6, 6, 6]
    assert [r.measure_layer for r in out["blue"].records] == [4, 6]


def test_blue_reuses_replay_and_spread_anchors_and_its_first_update_is_replays(plans):
    _, _, _, out = plans
    blue = out["blue"]
    assert blue.anchors[4] is out["replay"].anchors[4] and blue.anchors[6] is out["spread"].anchors[6]
    name = "model.layers.4.mlp.down_proj.weight"
    # Same anchor, same unedited model, same full residual at l_1: the same update, bit for bit.
    assert torch.equal(blue.updates[name], out["replay"].updates[name])
    # l_n: the residual is measured after l_1 is edited, against the l_n anchor.
    after_first = blue.trajectory.after[4][6]
    z = blue.anchors[6].value[0].float().cpu()
    assert blue.records[1].error_norm == pytest.approx(float((z - after_first).norm(dim=-1).mean()), rel=1e-4)


def test_onelayer_is_spread_with_only_the_last_layer(model_tok, plans):
    model, tok = model_tok
    hp, records, templates, out = plans
    plan = compute_edit(model, tok, records, hp.replace(layers=[6], alg_name="MEMIT_SPREAD"), "spread",
                        context_templates=templates, anchor=out["onelayer"].anchors[6])
    name = "model.layers.6.mlp.down_proj.weight"
    assert torch.equal(plan.updates[name], out["onelayer"].updates[name])


def test_nodiv_first_update_is_n_times_spreads(plans):
    """Same anchor and the same current state at step 0: the residual is n times larger,
    and MEMIT's update is linear in the residual."""
    _, _, _, out = plans
    name = "model.layers.4.mlp.down_proj.weight"
    torch.testing.assert_close(out["nodiv"].updates[name], 3 * out["spread"].updates[name], rtol=1e-9, atol=1e-12)


def test_residual_ratio_and_cosine_by_hand(model_tok, plans):
    """The ratio after the last edited layer equals the one measured on the edited model
    by an independent forward pass; spreading's m_L is its anchor; the cosine at l_n is 1."""
    from easyedit_replay.editor import apply_plan, weight_transaction
    from easyedit_replay.tracing import resolve_parameter

    model, tok = model_tok
    hp, _, _, out = plans
    plan = out["spread"]
    torch.testing.assert_close(plan.trajectory.final_target, plan.anchors[6].value[0].float().cpu(),
                               rtol=1e-4, atol=1e-4)
    params = {n: resolve_parameter(model, n) for n in plan.updates}
    probes = bare_probes(tok, plan.requests, hp.fact_token)
    before = read_at_lookup(model, tok, probes, outputs=["model.layers.6"])["out:model.layers.6"].float()
    with weight_transaction(params, restore_always=True):
        apply_plan(model, plan, hp)
        after = read_at_lookup(model, tok, probes, outputs=["model.layers.6"])["out:model.layers.6"].float()
    m = plan.trajectory.final_target
    expected = (m - after).norm(dim=-1) / (m - before).norm(dim=-1)
    torch.testing.assert_close(residual_ratios(plan)[6], expected, rtol=1e-4, atol=1e-5)
    for mode, p in out.items():
        cos = passive_cosines(p)
        assert torch.allclose(cos[6], torch.ones_like(cos[6]), atol=1e-5), mode
        assert all(((-1 - 1e-6) <= c).all() and (c <= 1 + 1e-6).all() for c in cos.values())
    # Replay's final target is its replayed z^{l_n}, and its ratio at l_1 is below spreading's
    # (2 demo edits, 2 anchor steps: measured 0.60 vs 0.97).
    torch.testing.assert_close(out["replay"].trajectory.final_target,
                               out["replay"].targets.values[(6, hp.layer_module_tmp)].float().cpu())
    assert float(residual_ratios(out["replay"])[4].mean()) < float(residual_ratios(out["spread"])[4].mean())


def test_distribution_shift_by_hand():
    before = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05] + [0.0] * 7).clamp(min=1e-30))
    after = torch.log(torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1] + [0.0] * 7).clamp(min=1e-30))
    got = distribution_shift(before, after)
    kl = 0.5 * math.log(5) + 0.3 * math.log(0.5) + 0.1 * math.log(1.0) + 2 * 0.05 * math.log(0.5)
    assert got["locality_dkl"] == pytest.approx(kl, rel=1e-5)
    assert got["locality_top1"] == 0.0  # argmax 0 vs 1
    assert got["locality_top5"] == 1.0
    same = distribution_shift(before, before)
    assert same["locality_dkl"] == 0.0 and same["locality_top10"] == 1.0


def test_metrics_on_the_unedited_model(model_tok, demo_records):
    """Against itself the model has DKL 0 and full Top-k overlap; Accuracy (exact match
    under greedy decoding) is 1 for a target that IS the greedy continuation and 0 once its
    last word is changed."""
    model, tok = model_tok
    records = demo_records[:4]
    base = evaluate_records(model, tok, records)
    again = evaluate_records(model, tok, records, base)
    assert len(again.locality_logp) == len(records) and again.locality_logp[0].ndim == 1  # [V], beside the rows
    for r in again.rows:
        assert abs(r["locality_dkl"]) < 1e-6 and r["locality_top1"] == r["locality_top10"] == 1.0
        assert r["specificity"] == 1.0
    gens = greedy_generate(model, tok, [r["prompt"] for r in records], max_new_tokens=3)
    greedy = [{**r, "target_new": g.strip()} for r, g in zip(records, gens) if g.startswith(" ") and g.strip()]
    assert len(greedy) >= 3, gens
    assert [row["efficacy_exact"] for row in evaluate_records(model, tok, greedy).rows] == [1.0] * len(greedy)
    wrong = [{**r, "target_new": r["target_new"].rsplit(" ", 1)[0] + " zebra"} for r in greedy]
    assert [row["efficacy_exact"] for row in evaluate_records(model, tok, wrong).rows] == [0.0] * len(wrong)
