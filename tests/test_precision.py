"""Half-precision weights, full-precision math (issue 19, precision.py): SmolLM2 in bf16 and
fp16 on the CPU against float32, for all four algorithms and every target construction."""

from __future__ import annotations

import copy

import pytest
import torch

from easyedit_replay.algorithms import load_hparams
from easyedit_replay.cli import default_hparams_path
from easyedit_replay.diagnostics import update_agreement
from easyedit_replay.editor import apply_plan, compute_edit, weight_transaction
from easyedit_replay.evaluate import evaluate_records
from easyedit_replay.precision import float32_window
from easyedit_replay.targets import MODES
from easyedit_replay.tracing import resolve_parameter

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Per-layer update vs the float32 edit (1 request, layers 4-6, 3 anchor steps), worst layer:
# relative difference |dW_half - dW_32| / |dW_32| and cosine. Measured maxima in the README.
UPDATE_TOL = {"bfloat16": dict(rel=0.25, cos=0.97), "float16": dict(rel=0.06, cos=0.998)}
# Efficacy / generalization (token accuracy, mean over 4 demo edits) vs float32.
METRIC_TOL = 0.1


@pytest.fixture(scope="module")
def half_models(model_tok):
    model, _ = model_tok
    return {name: copy.deepcopy(model).to(dtype) for name, dtype in HALF.items()}


def _hp(alg, stats_dir, **changes):
    return load_hparams(default_hparams_path(alg=f"{alg}_REPLAY"), stats_dir=stats_dir, **changes)


def test_window_is_float32_inside_and_restored_bit_identically(half_models, hparams):
    model = half_models["bfloat16"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with float32_window(model, hparams):
        assert model.model.layers[4].mlp.down_proj.weight.dtype == torch.float32
        assert model.model.layers[9].mlp.down_proj.weight.dtype == torch.float32  # l_n + 1
        assert model.model.layers[3].mlp.down_proj.weight.dtype == torch.bfloat16
        assert model.model.layers[10].mlp.down_proj.weight.dtype == torch.bfloat16
        out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n


@pytest.mark.parametrize("alg", ["MEMIT", "PMET", "EMMET", "AlphaEdit"])
def test_half_precision_updates_match_float32_for_every_construction(alg, model_tok, half_models, stats_dir,
                                                                      templates, demo_records):
    """bf16 and fp16 weights: no dtype error, finite updates, and each layer's update within
    UPDATE_TOL of the float32 edit; every construction for MEMIT, spread and replay for the
    others (the constructions differ only in the target bookkeeping the MEMIT run covers).
    Anchors are shared across the constructions of one dtype, as in ``compare``."""
    model, tok = model_tok
    modes = MODES if alg == "MEMIT" else ("spread", "replay")
    hp = _hp(alg, stats_dir, layers=[4, 5, 6], v_num_grad_steps=3, anchor_cache=False)
    ref_pool, ref = {}, {}
    for mode in modes:
        plan = compute_edit(model, tok, demo_records[:1], hp, mode=mode, context_templates=templates,
                            anchor=dict(ref_pool))
        ref_pool.update(plan.anchors)
        ref[mode] = plan.updates
    worst = {}
    for name, half in half_models.items():
        pool = {}
        for mode in modes:
            plan = compute_edit(half, tok, demo_records[:1], hp, mode=mode, context_templates=templates,
                                anchor=dict(pool))
            pool.update(plan.anchors)
            agree = update_agreement(plan.updates, ref[mode])
            assert set(plan.updates) == set(ref[mode])
            for weight, a in agree.items():
                assert a["rel_diff"] <= UPDATE_TOL[name]["rel"] and a["cosine"] >= UPDATE_TOL[name]["cos"], \
                    (name, mode, weight, a)
            worst[(name, mode)] = max(a["rel_diff"] for a in agree.values())
    print(alg, {k: round(v, 4) for k, v in worst.items()})


def _metrics(model, tok, hp, records, templates, baseline):
    from easyedit_replay.algorithms import weight_names

    params = {n: resolve_parameter(model, n) for n in weight_names(hp)}
    with weight_transaction(params, restore_always=True):
        plan = compute_edit(model, tok, records, hp, context_templates=templates)
        apply_plan(model, plan, hp)
        for name in plan.updates:
            assert params[name].dtype == next(model.parameters()).dtype and torch.isfinite(params[name]).all()
        rows = evaluate_records(model, tok, records, baseline)
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("efficacy_acc", "generalization_acc")}


@pytest.mark.parametrize("alg", ["MEMIT", "PMET", "EMMET", "AlphaEdit"])
def test_half_precision_demo_edit_metrics_match_float32(alg, model_tok, half_models, stats_dir, templates,
                                                        demo_records):
    """4 bundled demo edits in one batch, 8 anchor steps, spread and replay: efficacy and
    generalization of the bf16 and fp16 edits within METRIC_TOL of the float32 edit."""
    model, tok = model_tok
    records = demo_records[:4]
    for mode in ("spread", "replay"):
        hp = _hp(alg, stats_dir, v_num_grad_steps=8, alg_name=f"{alg}_{mode.upper()}")
        ref = _metrics(model, tok, hp, records, templates, evaluate_records(model, tok, records))
        for name, half in half_models.items():
            got = _metrics(half, tok, hp, records, templates, evaluate_records(half, tok, records))
            for k in ref:
                assert abs(got[k] - ref[k]) <= METRIC_TOL, (name, mode, k, got[k], ref[k])
            print(alg, mode, name, got, "float32", ref)
