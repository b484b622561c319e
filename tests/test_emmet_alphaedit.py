"""EMMET and AlphaEdit on the shared machinery: update rules, projections, the
sequential key cache, real SmolLM2 edits in both modes, and stock equivalence.

Thresholds were measured on SmolLM2-135M-Instruct (CPU, float32); the measured
values are given next to each assertion.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import easyedit_replay
from easyedit_replay.algorithms import algorithm_names, get_algorithm
from easyedit_replay.algorithms.alphaedit import (
    AlphaEdit, alphaedit_cache, null_space_projection, projection_path, projections, reset_alphaedit_cache,
)
from easyedit_replay.algorithms.emmet import emmet_solve
from easyedit_replay.anchors import Objective, optimize_anchors
from easyedit_replay.editor import apply_edit, compute_edit, weight_transaction
from easyedit_replay.errors import HyperParamsError, StatisticsError
from easyedit_replay.evaluate import evaluate_records, summarize
from easyedit_replay.algorithms import load_hparams
from easyedit_replay.prompts import prepare_requests
from easyedit_replay.stats import bundled_texts, second_moments
from easyedit_replay.targets import anchor_layer
from easyedit_replay.tracing import resolve_parameter

ROOT = Path(__file__).resolve().parents[1]

# Measured thresholds (hparams/README.md, "EMMET and AlphaEdit"). On the first 4
# demo edits every algorithm and mode measured efficacy 1.0 and specificity 1.0
# (generalization 0.5); the thresholds leave one miss of margin.
EFFICACY = {("EMMET", "spread"): 0.75, ("EMMET", "replay"): 0.75, ("AlphaEdit", "spread"): 0.75, ("AlphaEdit", "replay"): 0.75}
SPECIFICITY = {("EMMET", "spread"): 0.9, ("EMMET", "replay"): 0.9, ("AlphaEdit", "spread"): 0.9, ("AlphaEdit", "replay"): 0.9}
PRESERVED_MAX = {  # max over layers 4..8 of the mean |dW k0| / |W k0|, measured values in the test's docstring
    "replay_remaining": 0.05, "spread": 0.05,
    "replay": 0.1,  # the full residual on l_1 (the paper's method): measured 0.073 at layer 4
}
SEQ_STEPS = 25
SEQ_MARGIN = 0.0       # measured: mean log P(new) of batch 1 -0.0281 with the cache, -0.0317 without


def yaml_of(alg):
    return ROOT / "hparams" / f"{alg}_REPLAY" / "smollm2-135m.yaml"


def load(alg, stats_dir, **changes):
    return load_hparams(yaml_of(alg), stats_dir=stats_dir, **changes)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def restore(model, saved):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])


def assert_unchanged(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed"


# ----------------------------------------------------------------------------- registry, hparams


def test_registered_with_entry_points_and_yamls():
    for alg in ("EMMET", "AlphaEdit"):
        for mode in ("REPLAY", "SPREAD"):
            name = f"{alg}_{mode}"
            assert name in algorithm_names()
            assert get_algorithm(name).mode == mode.lower()
            assert callable(getattr(easyedit_replay, f"apply_{name.lower()}_to_model"))
    stock = {"EMMET": ["gpt-j-6B", "gpt2-xl", "llama-7b", "llama3.2-3b"],
             "AlphaEdit": ["gpt-j-6B", "gpt2-xl", "llama3-8b", "llama3.1-8b", "qwen2.5-7b", "qwen3.5-9b"]}
    for alg, families in stock.items():
        for family in families + ["smollm2-135m"]:
            hp = load_hparams(ROOT / "hparams" / f"{alg}_REPLAY" / f"{family}.yaml")
            assert hp.alg_name == f"{alg}_REPLAY" and type(hp).__name__ == f"{alg}HyperParams"


@pytest.mark.parametrize("alg, field, value, message", [
    ("EMMET", "emmet_lambda", -0.1, r"hparams\.emmet_lambda = -0\.1: must be a non-negative number"),
    ("EMMET", "update_norm_lambda", "x", r"hparams\.update_norm_lambda = 'x'"),
    ("AlphaEdit", "nullspace_threshold", 0, r"hparams\.nullspace_threshold = 0: must be a positive number"),
    ("AlphaEdit", "L2", 0, r"hparams\.L2 = 0: must be a positive number"),
])
def test_bad_rule_fields_name_the_field(stats_dir, alg, field, value, message):
    with pytest.raises(HyperParamsError, match=message):
        load(alg, stats_dir, **{field: value})


def test_alphaedit_yaml_needs_its_fields(stats_dir):
    with pytest.raises(HyperParamsError, match=r"missing required field\(s\) \['nullspace_threshold'\]"):
        config = load("AlphaEdit", stats_dir).to_dict()
        del config["nullspace_threshold"]
        load_hparams(config)


# ----------------------------------------------------------------------------- EMMET rule


def test_emmet_solve_meets_its_equality_constraint_and_falls_back_to_pinv(caplog):
    """With emmet_lambda = 0 the update satisfies dW K = R exactly (EMMET's constraint);
    a singular D (a zero key) is pseudo-inverted and logged, as stock does."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out, m = 24, 10, 4
    a = torch.randn(d_in, 3 * d_in, generator=g, dtype=torch.float64)
    cov = a @ a.T / (3 * d_in)
    keys = torch.randn(d_in, m, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, m, generator=g, dtype=torch.float64)
    upd = emmet_solve(keys, resid, cov, 100.0, 0.0, 0.0)
    assert float((upd @ keys - resid).abs().max()) < 1e-9
    # emmet_lambda > 0 relaxes the constraint: the reference formula, written independently
    c = 100.0 * cov + 0.5 * torch.eye(d_in, dtype=torch.float64)
    ref = resid @ torch.linalg.solve(keys.T @ torch.linalg.solve(c, keys) + 0.1 * torch.eye(m, dtype=torch.float64),
                                     torch.linalg.solve(c, keys).T)
    got = emmet_solve(keys, resid, cov, 100.0, 0.5, 0.1)
    assert float((got - ref).norm() / ref.norm()) < 1e-10
    assert float((got @ keys - resid).norm()) > 1e-6

    keys[:, 1] = 0
    with caplog.at_level(logging.WARNING, logger="easyedit_replay.algorithms.emmet"):
        upd = emmet_solve(keys, resid, cov, 100.0, 0.0, 0.0, where="w")
    assert "singular; using its pseudo-inverse" in caplog.text
    assert torch.isfinite(upd).all()
    keep = [0, 2, 3]
    assert float((upd @ keys[:, keep] - resid[:, keep]).abs().max()) < 1e-8


def test_emmet_single_layer_replay_equals_spread(model_tok, stats_dir, templates, demo_records):
    model, tok = model_tok
    before = snapshot(model)
    updates = {}
    for mode in ("SPREAD", "REPLAY"):
        hp = load("EMMET", stats_dir, alg_name=f"EMMET_{mode}", layers=[6], v_num_grad_steps=3)
        updates[mode] = compute_edit(model, tok, demo_records[:2], hp, mode.lower(), context_templates=templates).updates
    assert_unchanged(model, before)
    (name,) = updates["SPREAD"]
    assert float(updates["SPREAD"][name].norm()) > 0
    assert torch.equal(updates["SPREAD"][name], updates["REPLAY"][name])


# ----------------------------------------------------------------------------- AlphaEdit projection


def test_projection_is_an_orthogonal_projection_cached_under_stats_dir(model_tok, stats_dir, tmp_path, monkeypatch):
    model, tok = model_tok
    monkeypatch.chdir(tmp_path)
    hp = load("AlphaEdit", stats_dir, layers=[4])
    (m,) = modules = [hp.rewrite_module_tmp.format(l) for l in hp.layers]
    covs = second_moments(model, tok, hp, modules, progress=False)
    P = projections(model, hp, covs)
    p, cov = P[m].double(), covs[m].double()
    assert p.shape == (1536, 1536)  # from the weight: down_proj takes 1536 inputs
    assert float((p @ p - p).abs().max()) < 1e-4
    assert float((p - p.T).abs().max()) < 1e-6
    evals = torch.linalg.eigvalsh(cov)
    small = int((evals < hp.nullspace_threshold).sum())
    assert abs(float(torch.trace(p)) - small) < 1e-2 and 0 < small < 1536
    # P keeps only directions the preserved keys barely use: |P C P|_2 < threshold << |C|_2
    assert float(torch.linalg.eigvalsh(p @ cov @ p)[-1]) < 1.001 * hp.nullspace_threshold
    assert float(evals[-1]) > 20 * hp.nullspace_threshold
    path = projection_path(model, hp, m)
    assert path.exists() and str(path).startswith(str(Path(stats_dir)))
    assert f"nullspace{hp.nullspace_threshold!r}" in path.name and m in path.name
    assert torch.equal(torch.load(path), P[m])
    assert list(tmp_path.iterdir()) == []  # nothing written to the working directory

    # An existing file at P_loc is honoured; a wrong shape is a clear error.
    torch.save(torch.eye(1536)[None], tmp_path / "P.pt")
    got = projections(model, load("AlphaEdit", stats_dir, layers=[4], P_loc=str(tmp_path / "P.pt")), covs)
    assert torch.equal(got[m], torch.eye(1536))
    torch.save(torch.zeros(2, 1536, 1536), tmp_path / "P2.pt")
    with pytest.raises(StatisticsError, match=r"hparams\.P_loc = .*P2\.pt.* shape \(2, 1536, 1536\); expected \[1, d, d\]"):
        projections(model, load("AlphaEdit", stats_dir, layers=[4], P_loc=str(tmp_path / "P2.pt")), covs)


def test_projection_helper_matches_its_definition():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    s = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.01, 0.005, 0.001, 0.0])
    cov = u @ torch.diag(s) @ u.T
    p = null_space_projection(cov, 0.02)
    ref = u[:, 4:] @ u[:, 4:].T
    assert float((p - ref).abs().max()) < 1e-5


# ----------------------------------------------------------------------------- real edits

N_EDITS = 4


class _Anchors(dict):
    """Anchors of the first demo edits per anchor layer, optimized on first use (the anchor
    objective is the same for EMMET and AlphaEdit, so both reuse them)."""

    def __init__(self, model_tok, stats_dir, templates, records):
        super().__init__()
        self.args = (model_tok, stats_dir, templates, records)

    def __missing__(self, layer):
        (model, tok), stats_dir, templates, records = self.args
        hp = load("EMMET", stats_dir)
        self[layer] = optimize_anchors(model, tok, prepare_requests(records),
                                       Objective.of(hp, layer, [hp.layer_module_tmp], templates),
                                       chunk_size=hp.anchor_batch_size)
        return self[layer]

    def of(self, mode):
        return self[anchor_layer(mode, load("EMMET", self.args[1]).layers)]


@pytest.fixture(scope="module")
def anchors(model_tok, stats_dir, templates, demo_records):
    return _Anchors(model_tok, stats_dir, templates, demo_records[:N_EDITS])


@pytest.fixture(scope="module")
def baseline(model_tok, demo_records):
    model, tok = model_tok
    return evaluate_records(model, tok, demo_records[:N_EDITS])


def plan_of(model_tok, stats_dir, templates, demo_records, anchors, alg, mode):
    model, tok = model_tok
    hp = load(alg, stats_dir, alg_name=f"{alg}_{mode.upper()}")
    return hp, compute_edit(model, tok, demo_records[:N_EDITS], hp, mode.lower(), context_templates=templates,
                            anchor=anchors.of(mode))


def evaluate_plan(model_tok, plan, records, baseline):
    model, tok = model_tok
    params = {n: resolve_parameter(model, n) for n in plan.updates}
    with weight_transaction(params, restore_always=True):
        with torch.no_grad():
            for name, upd in plan.updates.items():
                params[name] += upd.to(params[name].dtype)
        return summarize(evaluate_records(model, tok, records, baseline).rows)


@pytest.mark.slow
@pytest.mark.parametrize("alg", ["EMMET", "AlphaEdit"])
@pytest.mark.parametrize("mode", ["spread", "replay"])
def test_batch_edit_of_demo_edits(model_tok, stats_dir, templates, demo_records, anchors, baseline, alg, mode):
    model, tok = model_tok
    before = snapshot(model)
    hp, plan = plan_of(model_tok, stats_dir, templates, demo_records, anchors, alg, mode)
    s = evaluate_plan(model_tok, plan, demo_records[:N_EDITS], baseline)
    assert_unchanged(model, before)
    print(alg, mode, s)
    assert s["efficacy_acc"] >= EFFICACY[alg, mode]
    assert s["specificity"] >= SPECIFICITY[alg, mode]


def sample_corpus_keys(model, tok, modules, n_texts=8):
    """``{module: [N, d_in]}`` inputs of ``modules`` at every token of the first bundled
    texts (the statistics corpus of the SmolLM2 YAMLs)."""
    seen = {m: [] for m in modules}
    hooks = [model.get_submodule(m).register_forward_hook(lambda mod, a, out, m=m: seen[m].append(a[0][0]))
             for m in modules]
    try:
        with torch.no_grad():
            for text in bundled_texts()[:n_texts]:
                model(input_ids=torch.tensor([tok.encode(text)]))
    finally:
        for h in hooks:
            h.remove()
    return {m: torch.cat(v, 0) for m, v in seen.items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replay_remaining", "replay", "spread"])
def test_alphaedit_leaves_preserved_keys_almost_unchanged(model_tok, stats_dir, templates, demo_records, anchors,
                                                          mode):
    """AlphaEdit's update acts only through the null space: ``dW (I - P) = 0``; on keys
    sampled from the statistics corpus ``|dW k0| / |W k0|`` stays small.

    Measured (4 demo edits, stock nullspace_threshold 2e-2), per layer 4..8:
    replay with the stock share (``replay_remaining``, the earlier default) AlphaEdit
    0.015 0.023 0.029 0.034 0.033, EMMET on the same anchors 0.018 0.025 0.029 0.026
    0.020; replay with the full residual (the paper's method, today's default) 0.073
    0.042 0.012 0.0011 0.0003: the first edit layer takes most of the edit, as the
    paper's Table 5 says; spread (stock AlphaEdit) 0.017 0.019 0.022 0.028 0.033. So on SmolLM2 AlphaEdit does NOT beat EMMET here: with the
    bundled statistics the stock threshold puts 976-1237 of 1536 directions, and
    48/41/36/32/20 % of the corpus keys' energy (trace(P C) / trace(C)), in the
    "null space" (SmolLM2's key second moment has median eigenvalue about 0.01). The exact property and the
    absolute bound are what hold.
    """
    model, tok = model_tok
    hp, plan = plan_of(model_tok, stats_dir, templates, demo_records, anchors, "AlphaEdit", mode)
    modules = [hp.rewrite_module_tmp.format(l) for l in hp.layers]
    covs = second_moments(model, tok, hp, modules, progress=False)
    P = projections(model, hp, covs)
    keys = sample_corpus_keys(model, tok, modules)
    ratios = []
    for m in modules:
        upd = plan.updates[m + ".weight"].double()
        p = P[m].double()
        assert float((upd - upd @ p).norm() / upd.norm()) < 1e-4
        w = resolve_parameter(model, m + ".weight").detach().double()
        k = keys[m].double().T
        ratios.append(float(((upd @ k).norm(dim=0) / (w @ k).norm(dim=0)).mean()))
    print(f"AlphaEdit {mode} mean |dW k0| / |W k0| per layer:", ratios)
    assert max(ratios) < PRESERVED_MAX[mode]


# ----------------------------------------------------------------------------- sequential cache


def rank_one_error(m: torch.Tensor) -> float:
    """``|M - c c^T| / |M|`` with ``c`` the column of the largest diagonal entry scaled:
    0 for a rank-one ``k k^T``, about 1 for anything else."""
    m = m.double()
    j = int(torch.argmax(torch.diagonal(m)))
    c = m[:, j] / m[j, j].sqrt()
    return float((m - torch.outer(c, c)).norm() / m.norm())


def cache_hp(stats_dir, **changes):
    return load("AlphaEdit", stats_dir, layers=[4, 5], v_num_grad_steps=2, **changes)


@pytest.mark.slow
def test_cache_is_committed_only_by_successful_edits(model_tok, stats_dir, templates, demo_records, monkeypatch):
    model, tok = model_tok
    original = snapshot(model)
    reset_alphaedit_cache(model)
    hp = cache_hp(stats_dir)
    names = [f"model.layers.{l}.mlp.down_proj.weight" for l in (4, 5)]
    try:
        apply_edit(model, tok, demo_records[:1], hp, context_templates=templates)
        first = alphaedit_cache(model)
        assert sorted(first) == names
        for n in names:  # one request: the cache is the rank-one K K^T of its key
            assert float(first[n].norm()) > 0
            assert rank_one_error(first[n]) < 1e-5
        after_first = snapshot(model)

        calls = []
        update = AlphaEdit.update

        def failing(self, inp):
            calls.append(inp.layer)
            if len(calls) == 2:
                raise RuntimeError("injected failure")
            return update(self, inp)

        monkeypatch.setattr(AlphaEdit, "update", failing)
        for kwargs in ({}, {"reset_cache": True}):
            calls.clear()
            with pytest.raises(RuntimeError, match="injected failure"):
                apply_edit(model, tok, demo_records[1:2], hp, context_templates=templates, **kwargs)
            assert_unchanged(model, after_first)
            now = alphaedit_cache(model)
            assert all(torch.equal(now[n], first[n]) for n in names)
        monkeypatch.setattr(AlphaEdit, "update", update)

        # sequential_edit=False: the edit is written, the cache is not touched
        apply_edit(model, tok, demo_records[1:2], hp, context_templates=templates, sequential_edit=False)
        assert all(torch.equal(alphaedit_cache(model)[n], first[n]) for n in names)
        restore(model, after_first)

        # a second committed edit adds its keys: cache = first + K2 K2^T
        apply_edit(model, tok, demo_records[1:2], hp, context_templates=templates, sequential_edit=True)
        second = alphaedit_cache(model)
        for n in names:
            assert rank_one_error(second[n] - first[n]) < 1e-4
            assert rank_one_error(second[n]) > 0.1

        # weights restored (as EasyEdit's editor does after a non-sequential edit): the
        # next edit rolls the cache back to match them
        rule = get_algorithm(hp.alg_name).rule
        covs = second_moments(model, tok, hp, [n[:-7] for n in names], progress=False)
        restore(model, after_first)
        state = rule.prepare(model, tok, hp, covs, {})
        assert all(torch.equal(state.cache[n], first[n]) for n in names)
        restore(model, original)
        state = rule.prepare(model, tok, hp, covs, {})
        assert all(not torch.any(state.cache[n]) for n in names)

        # reset_cache=True: the cache holds this edit's keys only
        restore(model, after_first)
        apply_edit(model, tok, demo_records[2:3], hp, context_templates=templates, reset_cache=True)
        third = alphaedit_cache(model)
        for n in names:
            assert rank_one_error(third[n]) < 1e-5
        reset_alphaedit_cache(model)
        assert alphaedit_cache(model) == {}
    finally:
        restore(model, original)
        reset_alphaedit_cache(model)


@pytest.mark.slow
def test_cache_protects_the_first_batch_over_sequential_batches(model_tok, stats_dir, templates, demo_records):
    """Three sequential batches of AlphaEdit_REPLAY; afterwards the first batch's edits
    are compared with the cache in use and with the cache reset before every batch."""
    model, tok = model_tok
    original = snapshot(model)
    batches = [demo_records[i:i + 2] for i in (0, 2, 4)]
    hp = load("AlphaEdit", stats_dir, v_num_grad_steps=SEQ_STEPS)
    result = {}
    try:
        for variant, kwargs in (("cache", {}), ("no cache", {"reset_cache": True})):
            reset_alphaedit_cache(model)
            for batch in batches:
                apply_edit(model, tok, batch, hp, context_templates=templates, sequential_edit=True, **kwargs)
            rows = evaluate_records(model, tok, batches[0]).rows
            result[variant] = (sum(r["logp_new"] for r in rows) / len(rows), summarize(rows)["efficacy_acc"])
            restore(model, original)
    finally:
        restore(model, original)
        reset_alphaedit_cache(model)
    print("first batch after 3 sequential batches (mean log P(new), efficacy):", result)
    assert result["cache"][0] > result["no cache"][0] + SEQ_MARGIN
    assert result["cache"][1] >= result["no cache"][1]


# ----------------------------------------------------------------------------- stock equivalence


@pytest.mark.slow
def test_spread_equals_stock_easyedit(tmp_path):
    """EMMET_SPREAD and AlphaEdit_SPREAD vs EasyEdit's stock code on the same inputs
    (two batches, so AlphaEdit's sequential cache is compared too)."""
    root = os.environ.get("EASYEDIT_ROOT")
    if not root or not Path(root, "easyeditor").is_dir():
        pytest.skip("set EASYEDIT_ROOT to an EasyEdit checkout to compare with stock EMMET/AlphaEdit")
    python = os.environ.get("EASYEDIT_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import datasets, transformers.modeling_attn_mask_utils"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import EasyEdit's requirements; set EASYEDIT_PYTHON to a Python that can")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([python, str(ROOT / "tests" / "helpers" / "stock_emmet_alphaedit.py")], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    print(result)
    assert result["EMMET_max_rel"] < 1e-4
    assert result["AlphaEdit_max_rel"] < 1e-4
    assert result["AlphaEdit_P_vs_get_project"] < 1e-4
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory
