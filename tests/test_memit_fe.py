"""MEMIT_REPLAY against EasyEdit's own forward replay, ``alg_name: MEMIT-FE``
(``easyeditor/models/memit_FE``): the same weight updates, YAMLs that take MEMIT-FE's
values, and MEMIT-FE's per-case z cache.

Tests against the host need ``EASYEDIT_ROOT`` (a checkout with ``easyeditor/models/memit_FE``)
and run EasyEdit's code in a child process (``EASYEDIT_PYTHON``, default this
interpreter) with ``tests/helpers/easyedit_stock.py``; they skip otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from easyedit_replay.editor import compute_edit

from .helpers.easyedit_host import host_inputs, relative_differences, run_host_script, run_stock
from .test_core import with_fields

HERE = Path(__file__).resolve().parent
HPARAMS = HERE.parent / "hparams"
EASYEDIT_ROOT = os.environ.get("EASYEDIT_ROOT")
requires_fe = pytest.mark.skipif(
    not EASYEDIT_ROOT or not Path(EASYEDIT_ROOT, "easyeditor", "models", "memit_FE").is_dir(),
    reason="set EASYEDIT_ROOT to an EasyEdit checkout with MEMIT-FE (and EASYEDIT_PYTHON to its interpreter)")
# Measured (6 anchor steps, 2 demo edits, SmolLM2, float32): per-layer relative difference
# of the updates 2.6e-6 (layer 4) rising to 6.6e-6 (layer 8) (docs/easyedit.md, "MEMIT_REPLAY and
# EasyEdit's MEMIT-FE").
PARITY_TOLERANCE = 1e-4


@pytest.mark.slow
@requires_fe
def test_replay_equals_easyedit_memit_fe(model_tok, hparams, templates, demo_records, stats_dir, tmp_path):
    """Our MEMIT_REPLAY == EasyEdit's MEMIT-FE ``execute_memit`` (its ``compute_z``,
    ``compute_ks``, ``get_cov``) on the same requests, hyperparameters, context
    templates and npz statistics: per-layer relative difference of the updates < 1e-4.

    The designed differences are all float rounding: our anchors are optimized for
    both requests in one batch and only through the layers from ``l_1`` on, and the
    replay reads every request's bare prompt in one right-padded batch, where
    MEMIT-FE runs one request at a time through the whole model."""
    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=6)
    assert hp.alg_name == "MEMIT_REPLAY" and hp.replay_share == "full"
    records = [{k: r[k] for k in ("prompt", "subject", "target_new", "ground_truth")} for r in demo_records[:2]]
    plan = compute_edit(model, tok, records, hp, "replay", context_templates=templates, stats_dir=stats_dir)
    # the same anchors with the stock share (residual divided over the layers left): must NOT match
    divided = compute_edit(model, tok, records, hp, "replay_remaining", context_templates=templates,
                           stats_dir=stats_dir, anchor=plan.anchors).updates
    modules = [hp.rewrite_module_tmp.format(l) for l in hp.layers]
    stock = run_stock("MEMIT-FE", host_inputs(model_tok, hp, records, templates, modules, stats_dir), tmp_path)
    rel = relative_differences(plan.updates, stock)
    print("relative difference per layer, MEMIT_REPLAY vs MEMIT-FE:", {k: f"{v:.2e}" for k, v in rel.items()})
    assert len(rel) == len(hp.layers) and all(float(stock[k].norm()) > 0 for k in stock)
    assert max(rel.values()) < PARITY_TOLERANCE, rel
    assert max(relative_differences(divided, stock).values()) > 0.1


def _yaml_values(path: Path) -> dict:
    """A YAML's fields with scientific-notation strings as floats (EasyEdit's
    ``construct_float_from_scientific_notation``; YAML reads ``5e-1`` as a string)."""
    cfg = yaml.safe_load(path.read_text())
    for key, value in cfg.items():
        if isinstance(value, str):
            try:
                cfg[key] = float(value)
            except ValueError:
                pass
    return cfg


@pytest.mark.skipif(not EASYEDIT_ROOT or not Path(EASYEDIT_ROOT, "hparams", "MEMIT-FE").is_dir(),
                    reason="set EASYEDIT_ROOT to an EasyEdit checkout with hparams/MEMIT-FE")
def test_replay_yamls_take_memit_fe_values():
    """For every model with an upstream ``hparams/MEMIT-FE/<model>.yaml`` our
    ``hparams/MEMIT_REPLAY/<model>.yaml`` exists and agrees on every field but
    ``alg_name`` and ``stats_dir`` (a path). Upstream's llama3.2-3b file says
    ``alg_name: "MEMIT"`` (EasyEdit 14cea82), so ``alg_name`` is not compared."""
    upstream = sorted(Path(EASYEDIT_ROOT, "hparams", "MEMIT-FE").glob("*.yaml"))
    assert len(upstream) >= 12
    for up in upstream:
        ours_path = HPARAMS / "MEMIT_REPLAY" / up.name
        assert ours_path.exists(), f"no {ours_path.relative_to(HPARAMS.parent)} for EasyEdit's MEMIT-FE {up.name}"
        ours, theirs = _yaml_values(ours_path), _yaml_values(up)
        assert ours["alg_name"] == "MEMIT_REPLAY"
        fields = set(theirs) - {"alg_name", "stats_dir"}
        assert fields <= set(ours), f"{up.name}: fields missing from ours: {sorted(fields - set(ours))}"
        mismatch = {k: (ours[k], theirs[k]) for k in sorted(fields) if ours[k] != theirs[k]}
        assert not mismatch, f"{up.name}: (ours, MEMIT-FE) {mismatch}"


@pytest.mark.skipif(not EASYEDIT_ROOT or not Path(EASYEDIT_ROOT, "hparams", "PMET").is_dir(),
                    reason="set EASYEDIT_ROOT to an EasyEdit checkout")
@pytest.mark.parametrize("alg", ["PMET", "EMMET", "AlphaEdit"])
def test_other_replay_yamls_take_their_stock_values(alg):
    """EasyEdit ships FE only for MEMIT, so ``<ALG>_REPLAY/<model>.yaml`` takes the
    stock ``hparams/<ALG>/<model>.yaml`` values (docs/configuration.md, "YAMLs for the models
    users run"): every field but ``alg_name`` and ``stats_dir``."""
    ours = sorted((HPARAMS / f"{alg}_REPLAY").glob("*.yaml"))
    compared = 0
    for path in ours:
        up = Path(EASYEDIT_ROOT, "hparams", alg, path.name)
        if not up.exists():  # e.g. smollm2-135m: ours only
            continue
        a, b = _yaml_values(path), _yaml_values(up)
        keys = (set(a) | set(b)) - {"alg_name", "stats_dir"}
        mismatch = {k: (a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)}
        assert not mismatch, f"{alg}_REPLAY/{path.name}: (ours, stock) {mismatch}"
        compared += 1
    assert compared >= 3


@pytest.mark.slow
@requires_fe
def test_easyedit_memit_fe_cache_serves_stale_z(model_tok, hparams, templates, demo_records, stats_dir, tmp_path):
    """MEMIT-FE's z cache key ``(layer, clamp_norm_factor, case_id)`` (used when
    ``apply_memit_FE_to_model`` is called with a ``cache_template``) holds neither the
    optimization settings, nor the algorithm, nor the weights: in each of the three
    cases of tests/helpers/easyedit_fe_cache.py the cached run differs from a fresh one.
    (Our anchor cache keys all three: tests/test_anchor_cache.py.)"""
    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=4)
    records = [{k: r[k] for k in ("prompt", "subject", "target_new", "ground_truth")} | {"case_id": 900 + i}
               for i, r in enumerate(demo_records[:2])]
    modules = [hp.rewrite_module_tmp.format(l) for l in hp.layers]
    src, report = tmp_path / "inputs.pt", tmp_path / "report.json"
    torch.save(host_inputs(model_tok, hp, records, templates, modules, stats_dir), src)
    run_host_script("easyedit_fe_cache.py", src, report)
    out = json.loads(report.read_text())
    print("MEMIT-FE z cache, largest relative update difference cached vs fresh:", out)
    assert out["v_lr"]["cached_vs_writer"] == 0.0       # the v_lr 0.1 run got the v_lr 0.5 z ...
    assert out["v_lr"]["cached_vs_fresh"] > 1e-2        # ... which is not the v_lr 0.1 edit
    l_n = [f for f in out["shared"]["files"] if f.startswith(f"{hp.layers[-1]}_") and f.endswith("_900.npz")]
    assert len(l_n) == 1                                 # MEMIT's l_n z file, written by MEMIT-FE
    assert out["shared"]["cached_vs_fresh"] > 1e-2      # stock MEMIT edited with FE's replayed z^{l_n}
    assert out["sequential"]["cached_vs_fresh"] > 1e-2  # B's z from the model that already held A


@pytest.mark.slow
@requires_fe
def test_easyedit_memit_fe_with_base_editor_padding_is_another_edit(model_tok, hparams, templates, demo_records,
                                                                     stats_dir, tmp_path):
    """``BaseEditor`` sets right padding only for the names in its list (ROME, MEMIT,
    EMMET, AlphaEdit, ...); MEMIT-FE keeps the LEFT padding it sets for GPT-2, Llama and
    fast tokenizers. MEMIT-FE's ``compute_z`` indexes its padded batch of rewriting
    prompts as if right-padded (lookup positions, target positions, the initial state of
    row 0), so through the editor it optimizes another objective. Measured here: the
    updates of ``execute_memit`` with the tokenizer as BaseEditor leaves it (left) vs
    right-padded, same everything else. (The plugin pads right internally whatever the
    tokenizer says.)"""
    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=6)
    records = [{k: r[k] for k in ("prompt", "subject", "target_new", "ground_truth")} for r in demo_records[:1]]
    modules = [hp.rewrite_module_tmp.format(l) for l in hp.layers]
    inputs = host_inputs(model_tok, hp, records, templates, modules, stats_dir)
    right = run_stock("MEMIT-FE", inputs, tmp_path, "_right")
    left = run_stock("MEMIT-FE", inputs | {"padding_side": "left"}, tmp_path, "_left")
    rel = relative_differences(left, right)
    print("MEMIT-FE, left- vs right-padded tokenizer, relative update difference per layer:",
          {k: f"{v:.2e}" for k, v in rel.items()})
    assert min(rel.values()) > 0.1, rel
