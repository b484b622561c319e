"""Target-accuracy diagnostics and the comparison report."""

from __future__ import annotations

import json

import pytest
import torch

from easyedit_replay.diagnostics import layer_targets, target_accuracy
from easyedit_replay.editor import WeightsCopy, apply_edit, weight_transaction
from easyedit_replay.experiments.statistics import bootstrap
from easyedit_replay.tracing import resolve_parameter

from .test_core import states_of_prompt, with_fields


def _edited(model, tok, hparams, templates, records, alg):
    hp = with_fields(hparams, alg_name=alg, layers=[3, 5, 7], v_num_grad_steps=4)
    names = [f"model.layers.{l}.mlp.down_proj.weight" for l in hp.layers]
    return hp, {n: resolve_parameter(model, n) for n in names}


def test_zero_when_the_state_equals_the_target_and_hand_computation(model_tok, hparams, templates, demo_records):
    model, tok = model_tok
    hp, params = _edited(model, tok, hparams, templates, demo_records, "MEMIT_REPLAY")
    with weight_transaction(params, restore_always=True):
        _, weights_copy = apply_edit(model, tok, demo_records[:2], hp, context_templates=templates)
        plan = weights_copy.plan  # the plan travels with EasyEdit's weights_copy, no global registry
        assert isinstance(weights_copy, WeightsCopy) and dict(weights_copy) == {}  # return_orig_weights=False
        (acc,) = target_accuracy(model, tok, plan, hp)
        assert acc.relative_error.shape == (3, 2) and float(acc.relative_error.min()) > 1e-3

        # Hand computation for request 1 at layer 5: run the edited model on the bare prompt alone.
        h5 = states_of_prompt(model, tok, plan.requests[1], hp, [5])[5]
        t = plan.targets.values[(5, hp.layer_module_tmp)][1].float()
        hand = float((h5 - t).norm() / t.norm())
        assert abs(hand - float(acc.relative_error[1, 1])) < 1e-4 * max(hand, 1e-3)

        # Replace the targets by the states the edited model reaches: the error vanishes.
        reached = [states_of_prompt(model, tok, r, hp, hp.layers) for r in plan.requests]
        for l in hp.layers:
            plan.targets.values[(l, hp.layer_module_tmp)] = torch.stack([x[l] for x in reached])
        (zero,) = target_accuracy(model, tok, plan, hp)
        assert float(zero.relative_error.abs().max()) < 1e-5
        # The edited model's NLL of the target is measured with the anchor objective's prompts.
        assert zero.edited_nll.shape == (2,) and torch.isfinite(zero.edited_nll).all()


def test_spread_implicit_targets_accumulate_the_residuals(model_tok, hparams, templates, demo_records):
    model, tok = model_tok
    hp, params = _edited(model, tok, hparams, templates, demo_records, "MEMIT_SPREAD")
    with weight_transaction(params, restore_always=True):
        _, weights_copy = apply_edit(model, tok, demo_records[:1], hp, context_templates=templates, return_orig_weights=True)
        plan = weights_copy.plan
        assert set(weights_copy) == set(plan.updates) == set(params)
        assert not any(torch.equal(weights_copy[n], params[n]) for n in params)  # edited; the copy is the original
    assert all(torch.equal(weights_copy[n], params[n]) for n in params)  # restored by the transaction
    tmp = hp.layer_module_tmp
    targets = layer_targets(plan, tmp)
    r3, r5 = plan.residuals[(3, tmp)], plan.residuals[(5, tmp)]
    assert torch.allclose(targets[3], plan.unedited[(3, tmp)] + r3)
    assert torch.allclose(targets[5], plan.unedited[(5, tmp)] + r3 + r5)
    assert torch.equal(targets[7], plan.anchor.value[0].float())
    # Spread's residuals are shares of one vector measured at the last layer: r_i * (n - i) is
    # the error still open at l_n before step i.
    assert float(r3.norm()) > 0 and plan.records[0].measure_layer == 7


def test_bootstrap_interval():
    mean, lo, hi = bootstrap([0.0, 1.0] * 50, n_boot=500, seed=1)
    assert mean == 0.5 and 0.38 < lo < 0.5 < hi < 0.62
    assert bootstrap([None, None]) == (None, None, None)
    assert bootstrap([0.7] * 5) == (0.7, 0.7, 0.7)
    assert bootstrap([0.7, float("inf"), float("nan"), None, 0.7]) == (0.7, 0.7, 0.7)


def test_residual_ratio_is_undefined_where_the_anchor_needed_no_change():
    """``|m_L - h_L(after)| / |m_L - h_L(unedited)|`` by hand, and NaN (not ``inf``) for a
    request whose target is its unedited state; the paired statistics then drop it."""
    from types import SimpleNamespace

    from easyedit_replay.diagnostics import residual_ratios
    from easyedit_replay.experiments.statistics import paired_difference

    unedited = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # [R=2, d=2] at l_n
    target = torch.tensor([[3.0, 4.0], [1.0, 1.0]])  # request 1: target == unedited
    after = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    plan = SimpleNamespace(trajectory=SimpleNamespace(final_target=target, final_layer=8, unedited={8: unedited},
                                                      after={4: {8: after}}))
    ratio = residual_ratios(plan)[4]
    assert ratio[0].item() == pytest.approx(3.0 / 5.0) and torch.isnan(ratio[1])
    rows = [{"r": v} for v in ratio.tolist()]
    assert paired_difference(rows, [{"r": 0.5}, {"r": 0.5}], "r") == pytest.approx((0.1, 0.1, 0.1))
    assert paired_difference([{"r": float("inf")}], [{"r": 0.5}], "r") == (None, None, None)


def test_compare_produces_every_column_json_and_plots(tmp_path, capsys):
    from easyedit_replay.cli import main

    out, js = tmp_path / "report", tmp_path / "r.json"
    rc = main(["compare", "--algs", "MEMIT", "--n", "3", "--steps", "2", "--batch-size", "2", "--sequential",
               "--out", str(out), "--json", str(js), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    for col in ("efficacy", "generalization", "specificity", "fluency", "target error", "edit time s",
                "eff. Success", "eff. Acc", "gen. Success", "gen. Acc", "DKL", "Top-1", "Top-5", "Top-10",
                "residual ratio", "layer 4", "layer 8"):
        assert col in text
    assert text.count("MEMIT") >= 2 and "replay" in text and "spread" in text
    data = json.loads(js.read_text())
    run = data["runs"]["MEMIT/replay"]
    assert len(run["per_edit"]) == 3 and len(run["curve"]) == 2 and run["curve"][-1]["edits"] == 3
    assert all(r["target_error"] is not None and r["fluency"] is not None for r in run["per_edit"])
    assert all(r["locality_dkl"] >= 0 and 0 <= r["locality_top5"] <= 1 for r in run["per_edit"])
    assert sorted(run["diagnostics"]["residual_ratio"]) == ["4", "5", "6", "7", "8"]
    assert run["diagnostics"]["passive_cosine"]["8"] == pytest.approx(1.0, abs=1e-5)
    assert not any(k.startswith("_") for r in run["per_edit"] for k in r)
    import matplotlib.image as mpimg

    for name in ("residual_ratio.png", "target_error.png", "sequential.png"):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    report = (out / "report.md").read_text()
    assert "![target_error](target_error.png)" in report and "![residual_ratio](residual_ratio.png)" in report
    assert "Tables 2 and 5" in report and "DKL" in report
