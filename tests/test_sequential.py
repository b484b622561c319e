"""Sequential editing on the real model (2-4 edits, 2 anchor steps): the options
(``sequential_keys``, ``norm_anchor``) are bit-identical to an edit without them when
off, the model's record of earlier batches and its key drift, re-keyed and edit-time
key protection, norm-anchored targets, ``+refresh`` and its row weight
(``+refresh=W``), and every candidate through ``scale --sequential`` with a stop and a
resume."""

from __future__ import annotations

import json

import pytest
import torch

from easyedit_replay import sequential
from easyedit_replay.experiments import cells, scale
from easyedit_replay.algorithms import get_algorithm, load_hparams, weight_names
from easyedit_replay.algorithms.alphaedit import alphaedit_cache, alphaedit_untracked, reset_alphaedit_cache
from easyedit_replay.cli import default_hparams_path, main
from easyedit_replay.editor import apply_plan, compute_edit, weight_transaction
from easyedit_replay.errors import HyperParamsError
from easyedit_replay.experiments.scale import ScaleConfig, run_scale
from easyedit_replay.targets import get_construction, mode_spec, parse_mode
from easyedit_replay.tracing import resolve_parameter

from .test_scale import _cells

pytestmark = pytest.mark.slow

TEMPLATES = [["{}"], ["The following is true. {}"]]
ALGS = ("MEMIT", "EMMET", "PMET", "AlphaEdit")


def _hp(stats_dir, alg, layers=(4, 5, 6), **changes):
    return load_hparams(default_hparams_path(alg=f"{alg}_REPLAY"), stats_dir=stats_dir, v_num_grad_steps=2,
                        layers=list(layers), **changes)


@pytest.fixture()
def fresh(model_tok):
    """The model with no sequential record and no AlphaEdit cache, before and after."""
    model, _ = model_tok
    sequential.reset_sequential_state(model)
    reset_alphaedit_cache(model)
    yield
    sequential.reset_sequential_state(model)
    reset_alphaedit_cache(model)


def _two_batches(model, tok, records, hp, hp2=None, track=False):
    """Edit ``records[:2]`` then ``records[2:4]`` (``hp2`` for the second, default ``hp``)
    into ``model``; returns both plans and what ``inside(model)`` returned, with the
    weights restored after. ``inside`` runs with both batches applied."""
    hp2 = hp2 or hp
    names = list(dict.fromkeys(weight_names(hp) + weight_names(hp2)))
    params = {n: resolve_parameter(model, n) for n in names}
    with weight_transaction(params, restore_always=True):
        if track:
            sequential.track_sequential(model)
        first = compute_edit(model, tok, records[:2], hp, get_algorithm(hp.alg_name).construction,
                             context_templates=TEMPLATES)
        apply_plan(model, first, hp)
        second = compute_edit(model, tok, records[2:4], hp2, get_algorithm(hp2.alg_name).construction,
                              context_templates=TEMPLATES)
        apply_plan(model, second, hp2)
        batches = sequential.edited_batches(model)
        now = [sequential.current_keys(model, tok, b) for b in batches]
    return first, second, batches, now


@pytest.mark.parametrize("alg", ALGS)
def test_options_off_are_bit_identical(model_tok, stats_dir, demo_records, fresh, alg):
    """Two sequential batches with the options at their off values and the model's record
    kept (the key-drift bookkeeping) give bit-identical anchors and updates to the same
    batches with no record; with nothing edited before, re-keyed protection is the stock
    solve too, and AlphaEdit's edit-time keys are its stock cache."""
    model, tok = model_tok
    layers = (7, 8)
    plain = _two_batches(model, tok, demo_records, _hp(stats_dir, alg, layers))
    sequential.reset_sequential_state(model)
    reset_alphaedit_cache(model)
    off = _hp(stats_dir, alg, layers, sequential_keys="stock", norm_anchor=False, sequential_refresh=False)
    tracked = _two_batches(model, tok, demo_records, off, track=True)
    assert len(tracked[2]) == 2 and not plain[2]  # the record was kept, and only when asked
    for a, b in zip(plain[:2], tracked[:2]):
        assert set(a.updates) == set(b.updates)
        assert all(torch.equal(a.updates[n], b.updates[n]) for n in a.updates)
        assert all(torch.equal(a.anchors[l].delta, b.anchors[l].delta) for l in a.anchors)
    sequential.reset_sequential_state(model)
    reset_alphaedit_cache(model)
    rekeyed = _two_batches(model, tok, demo_records, _hp(stats_dir, alg, layers, sequential_keys="rekeyed"))
    assert all(torch.equal(plain[0].updates[n], rekeyed[0].updates[n]) for n in plain[0].updates)
    assert not rekeyed[0].sequential.protected_keys and len(rekeyed[1].sequential.protected_keys) == len(plain[1].updates)
    assert not all(torch.equal(plain[1].updates[n], rekeyed[1].updates[n]) for n in plain[1].updates)
    if alg == "AlphaEdit":
        sequential.reset_sequential_state(model)
        reset_alphaedit_cache(model)
        edit_time = _two_batches(model, tok, demo_records, _hp(stats_dir, alg, layers, sequential_keys="edit_time"))
        assert all(torch.equal(plain[1].updates[n], edit_time[1].updates[n]) for n in plain[1].updates)


def test_key_drift_bookkeeping(model_tok, stats_dir, demo_records, fresh):
    """With no edit between two reads the drift is 0; a second batch that edits layer 4
    only leaves the first batch's layer-4 keys where they were and moves its keys at
    layers 5 and 6 (and its own layer-4 key has not moved)."""
    model, tok = model_tok
    hp = _hp(stats_dir, "MEMIT")
    params = {n: resolve_parameter(model, n) for n in weight_names(hp)}
    with weight_transaction(params, restore_always=True):
        sequential.track_sequential(model)
        plan = compute_edit(model, tok, demo_records[:2], hp, "replay", context_templates=TEMPLATES)
        apply_plan(model, plan, hp)
        first, again = sequential.key_drift(model, tok), sequential.key_drift(model, tok)
        assert first == again
        for stats in first[0].values():  # the keys recorded at the edit are the model's keys now
            assert stats["relative_change_max"] < 1e-5 and stats["cosine"] > 1 - 1e-9
        only4 = hp.replace(layers=[4])
        plan = compute_edit(model, tok, demo_records[2:4], only4, "replay", context_templates=TEMPLATES)
        apply_plan(model, plan, only4)
        drift = sequential.key_drift(model, tok)
        assert len(sequential.edited_batches(model)) == 2
    assert len(drift) == 2 and list(drift[1]) == ["model.layers.4.mlp.down_proj.weight"]
    at = {int(name.split(".")[2]): stats for name, stats in drift[0].items()}
    assert at[4]["relative_change_max"] < 1e-5 and drift[1]["model.layers.4.mlp.down_proj.weight"]["relative_change"] < 1e-5
    for layer in (5, 6):
        assert at[layer]["relative_change"] > 1e-3 and at[layer]["cosine"] < 1 - 1e-6
    assert sequential.edited_batches(model) == []  # weights restored: the record rolls back


@pytest.mark.parametrize("alg", ["MEMIT", "AlphaEdit"])
def test_rekeyed_protection_holds_the_current_keys(model_tok, stats_dir, demo_records, fresh, alg):
    """After two sequential batches with ``sequential_keys: rekeyed`` the keys the second
    batch's solve protected at each layer are the first batch's keys read from the
    current model (MEMIT's old-key term; AlphaEdit's cache in the solve). For MEMIT,
    protecting them shrinks what the second batch's update changes at those keys, and
    with ``edit_time`` the protected keys are the stored keys of the first batch's edit,
    which the second batch's layer-4 update has moved at layers 5 and 6."""
    model, tok = model_tok
    _, second, batches, now = _two_batches(model, tok, demo_records, _hp(stats_dir, alg, sequential_keys="rekeyed"))
    assert sorted(second.sequential.protected_keys) == sorted(second.updates)
    for name, protected in second.sequential.protected_keys.items():
        assert protected.shape == (2, 1536)
        torch.testing.assert_close(protected, now[0][name], rtol=1e-4, atol=1e-5)  # reads batched differently
    if alg != "MEMIT":
        return
    sequential.reset_sequential_state(model)
    stock = _two_batches(model, tok, demo_records, _hp(stats_dir, alg), track=True)
    for name, update in second.updates.items():
        keys = now[0][name].double().T  # [d_in, 2]
        mine = float((update.double() @ keys).norm() / keys.norm())
        plain = float((stock[1].updates[name].double() @ keys).norm() / keys.norm())
        assert mine < plain, name
    sequential.reset_sequential_state(model)
    _, second, batches, now = _two_batches(model, tok, demo_records, _hp(stats_dir, alg, sequential_keys="edit_time"))
    for name, protected in second.sequential.protected_keys.items():
        assert torch.equal(protected, batches[0].keys[name])
        change = float((protected - now[0][name]).norm() / protected.norm())
        assert (change < 1e-5) if ".4." in name else (change > 1e-3), name


def test_norm_anchored_targets(model_tok, stats_dir, demo_records, fresh):
    """``norm_anchor``: every target of the first batch (replay's anchor at layer 4 and the
    replayed ones at 5 and 6) asks its rewritten module for a value of norm N, the
    batch's mean; the second batch keeps the first batch's N; without it the values
    differ from N."""
    from easyedit_replay.reads import bare_probes, read_at_lookup

    model, tok = model_tok
    hp = _hp(stats_dir, "MEMIT", norm_anchor=True)
    first, second, _, _ = _two_batches(model, tok, demo_records, hp)
    plain = compute_edit(model, tok, demo_records[:2], _hp(stats_dir, "MEMIT"), "replay", context_templates=TEMPLATES)
    names = {l: (f"model.layers.{l}", f"model.layers.{l}.mlp.down_proj") for l in (4, 5, 6)}
    reads = read_at_lookup(model, tok, bare_probes(tok, first.requests, hp.fact_token),
                           outputs=[n for pair in names.values() for n in pair])
    for layer, (block, mlp) in names.items():
        key = (layer, "model.layers.{}")
        h0, v0 = reads["out:" + block].float(), reads["out:" + mlp].float()
        report = first.sequential.norms[f"{layer}/model.layers.{{}}"]
        anchor = first.sequential.norm_reference[key]
        assert report["not_edited"] == 0 and anchor == pytest.approx(report["value_norm_mean"], rel=1e-6)
        value = v0 + first.targets.values[key].float() - h0
        torch.testing.assert_close(value.norm(dim=-1), torch.full((2,), anchor), rtol=1e-4, atol=1e-4)
        free = (v0 + plain.targets.values[key].float() - h0).norm(dim=-1)
        assert (free - anchor).abs().max() > 1e-2
        assert second.sequential.norm_reference[key] == anchor


def test_mode_specs_with_options_and_their_errors(stats_dir):
    assert mode_spec(" replay + rekeyed ") == "replay+rekeyed"
    assert mode_spec("replay_tau=0.250+norm_anchor") == "replay_tau=0.25+norm_anchor"
    assert parse_mode("spread+old_keys")[1] == {"sequential_keys": "edit_time"}
    assert parse_mode("replay+refresh")[1] == {"sequential_refresh": True}
    assert parse_mode("replay_tau=0.5+rekeyed+norm_anchor")[1] == {"replay_tau": 0.5, "sequential_keys": "rekeyed",
                                                                   "norm_anchor": True}
    with pytest.raises(ValueError, match="not a sequential option"):
        parse_mode("replay+rekey")
    with pytest.raises(ValueError, match="sequential_keys to both"):
        parse_mode("replay+rekeyed+old_keys")
    with pytest.raises(ValueError, match="sets hyperparameters"):
        get_construction("replay+rekeyed")
    with pytest.raises(HyperParamsError, match="sequential_keys.*rekeyed"):
        _hp(stats_dir, "MEMIT", sequential_keys="re-keyed")
    with pytest.raises(HyperParamsError, match="norm_anchor"):
        _hp(stats_dir, "MEMIT", norm_anchor="yes")


def test_the_modes_help_names_every_registered_option_and_construction():
    """``--modes`` help of compare, scale and tune is written out by hand (the parser does
    not import torch); it must name every registered sequential option and construction."""
    from easyedit_replay.cli import build_parser
    from easyedit_replay.sequential import SEQUENTIAL_OPTIONS
    from easyedit_replay.targets import CONSTRUCTIONS

    sub = next(a for a in build_parser()._actions if a.dest == "command" or getattr(a, "choices", None))
    for name in ("compare", "scale", "tune"):
        [modes] = [a for a in sub.choices[name]._actions if a.dest == "modes"]
        text = " ".join(modes.help.split())
        assert all(f"+{o}" in text for o in SEQUENTIAL_OPTIONS), (name, sorted(SEQUENTIAL_OPTIONS))
        assert all(c in text for c in CONSTRUCTIONS), (name, sorted(CONSTRUCTIONS))


def _block_states(model, tok, requests, hp):
    """``[L, R, d]`` block outputs of ``requests`` (bare prompts, lookup token) at every edit layer."""
    from easyedit_replay.reads import bare_probes, read_at_lookup

    sites = [hp.layer_module_tmp.format(l) for l in hp.layers]
    reads = read_at_lookup(model, tok, bare_probes(tok, requests, hp.fact_token), outputs=sites)
    return torch.stack([reads["out:" + n].float() for n in sites])


@pytest.mark.parametrize("alg,mode", [("MEMIT", "replay"), ("MEMIT", "spread"), ("AlphaEdit", "replay")])
def test_refresh_restores_the_earlier_edits(model_tok, stats_dir, demo_records, fresh, alg, mode):
    """``sequential_refresh`` (``+refresh``): the first batch is the stock edit, bit for bit
    (nothing earlier to restore), and the record keeps the states its requests reached
    at every edit layer; the second batch's solve also takes the first batch's rows, so
    that after both batches the first batch's states sit closer to the states they
    reached after batch 1 than after the same two batches without it (real model,
    layers 4-6). AlphaEdit's sequential cache grows by the second batch's own 2 keys
    only (rank 2 per layer, not the 4 rows of its solve)."""
    model, tok = model_tok
    gaps = {}
    for refresh in (False, True):
        sequential.reset_sequential_state(model)
        reset_alphaedit_cache(model)
        hp = _hp(stats_dir, alg, sequential_refresh=refresh)
        names = weight_names(hp)
        params = {n: resolve_parameter(model, n) for n in names}
        with weight_transaction(params, restore_always=True):
            first = compute_edit(model, tok, demo_records[:2], hp, mode, context_templates=TEMPLATES)
            apply_plan(model, first, hp)
            reached = _block_states(model, tok, first.requests, hp)
            cache_1 = alphaedit_cache(model) if alg == "AlphaEdit" else {}
            second = compute_edit(model, tok, demo_records[2:4], hp, mode, context_templates=TEMPLATES)
            apply_plan(model, second, hp)
            grown = [int(torch.linalg.matrix_rank((alphaedit_cache(model)[n] - cache_1[n]).double(), rtol=1e-6)) for n in cache_1]
            assert grown == [2] * len(cache_1), grown
            gaps[refresh] = float((_block_states(model, tok, first.requests, hp) - reached).norm(dim=-1).mean())
        if refresh:
            assert all(torch.equal(first.updates[n], plain_first.updates[n]) for n in names)
            kept = first.sequential.states  # what the record holds: the states batch 1 reached
            assert sorted(kept) == list(hp.layers)
            assert torch.allclose(torch.stack([kept[l] for l in hp.layers]), reached, atol=1e-4)
            assert not all(torch.equal(second.updates[n], plain_second.updates[n]) for n in names)
        plain_first, plain_second = first, second
    assert gaps[True] < 0.8 * gaps[False], gaps


def test_refresh_keeps_the_untracked_alphaedit_cache(model_tok, stats_dir, demo_records, fresh):
    """AlphaEdit ``+refresh`` after an edit the record does not hold (made before
    tracking began): the untracked part of the cache is the cache that edit left, kept
    as it was by the recorded batches; the second recorded batch's solve adds it to
    ``K K^T`` (its update differs from the one with the untracked part dropped, changes
    less at the earlier edit's keys, and moves that edit's states less); it rolls back
    with the weights, and with no record all of the cache is untracked (real model,
    layers 4-6)."""
    from easyedit_replay.stats import second_moments

    model, tok = model_tok
    plain, hp = _hp(stats_dir, "AlphaEdit"), _hp(stats_dir, "AlphaEdit", sequential_refresh=True)
    names = weight_names(hp)
    params = {n: resolve_parameter(model, n) for n in names}
    rule = get_algorithm(hp.alg_name).rule
    covs = second_moments(model, tok, hp, [n[: -len(".weight")] for n in names], progress=False)
    with weight_transaction(params, restore_always=True) as original:
        untracked_edit = compute_edit(model, tok, demo_records[:2], plain, "replay", context_templates=TEMPLATES)
        apply_plan(model, untracked_edit, plain)
        before = alphaedit_cache(model)  # the untracked edit's K K^T, rank 2 per weight
        assert sequential.edited_batches(model) == [] and all(torch.any(before[n]) for n in names)
        assert all(torch.equal(alphaedit_untracked(model)[n], before[n]) for n in names)  # no record: all of it
        reached = _block_states(model, tok, untracked_edit.requests, hp)

        sequential.track_sequential(model)
        first = compute_edit(model, tok, demo_records[2:4], hp, "replay", context_templates=TEMPLATES)
        apply_plan(model, first, hp)
        assert len(sequential.edited_batches(model)) == 1
        untracked = alphaedit_untracked(model)
        assert sorted(untracked) == sorted(names) and all(torch.equal(untracked[n], before[n]) for n in names)
        after_first = {n: p.detach().clone() for n, p in params.items()}

        second = compute_edit(model, tok, demo_records[4:6], hp, "replay", context_templates=TEMPLATES)
        apply_plan(model, second, hp)
        kept = alphaedit_untracked(model)
        assert all(torch.equal(kept[n], before[n]) for n in names)  # a recorded batch leaves it as it was
        moved = float((_block_states(model, tok, untracked_edit.requests, hp) - reached).norm(dim=-1).mean())
        with torch.no_grad():  # weights back at their state before the second batch: its rollback
            for n, p in params.items():
                p.copy_(after_first[n])
        state = rule.prepare(model, tok, hp, covs, {})
        assert all(torch.equal(state.untracked[n], before[n]) for n in names)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])
        state = rule.prepare(model, tok, hp, covs, {})
        assert all(state.untracked[n] is None and not torch.any(state.cache[n]) for n in names)

        # the same second batch with the untracked part dropped (the cache forgotten: the
        # recorded part is not in a +refresh solve, so only the untracked part goes)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(after_first[n])
        reset_alphaedit_cache(model)
        dropped = compute_edit(model, tok, demo_records[4:6], hp, "replay", context_templates=TEMPLATES,
                               anchor=dict(second.anchors))
        assert all(torch.equal(second.anchors[l].delta, dropped.anchors[l].delta) for l in second.anchors)
        apply_plan(model, dropped, hp)
        moved_dropped = float((_block_states(model, tok, untracked_edit.requests, hp) - reached).norm(dim=-1).mean())
        assert alphaedit_untracked(model) == {}  # the cache holds the recorded second batch alone
        sequential.reset_sequential_state(model)  # no record: all of the cache is untracked
        assert all(torch.equal(alphaedit_untracked(model)[n], alphaedit_cache(model)[n]) for n in names)
    for n in names:
        assert not torch.equal(second.updates[n], dropped.updates[n]), n
        span = torch.linalg.eigh(before[n].double()).eigenvectors[:, -2:]  # [d_in, 2] the untracked edit's keys
        at_keys, at_keys_dropped = ((u.double() @ span).norm() for u in (second.updates[n], dropped.updates[n]))
        assert at_keys < 0.75 * at_keys_dropped, (n, float(at_keys), float(at_keys_dropped))
    assert moved < 0.8 * moved_dropped, (moved, moved_dropped)


def test_refresh_refusals(model_tok, stats_dir, demo_records, fresh):
    """Where re-targeting does not apply, a clear error names the field, and no weight moves."""
    model, tok = model_tok
    with pytest.raises(HyperParamsError, match="sequential_refresh.*sequential_keys"):
        _hp(stats_dir, "MEMIT", sequential_refresh=True, sequential_keys="rekeyed")
    with pytest.raises(HyperParamsError, match="sequential_refresh"):
        _hp(stats_dir, "MEMIT", sequential_refresh="yes")
    for alg, mode, match in (("PMET", "replay", "module outputs"),
                             ("MEMIT", "replay_capacity", "share")):
        hp = _hp(stats_dir, alg, (7, 8), sequential_refresh=True)
        params = {n: resolve_parameter(model, n) for n in weight_names(hp)}
        before = {n: p.detach().clone() for n, p in params.items()}
        with pytest.raises(HyperParamsError, match=match):
            compute_edit(model, tok, demo_records[:2], hp, mode, context_templates=TEMPLATES)
        assert all(torch.equal(before[n], p) for n, p in params.items())


def test_refresh_weight_specs_and_validation(stats_dir, tmp_path):
    """``+refresh=W`` sets ``sequential_refresh`` and ``sequential_refresh_weight``, spelled
    canonically (``refresh=4.0`` -> ``refresh=4``, ``refresh=1`` -> ``refresh``); a weight
    that is not a positive finite number, a value for an option without one, and a weight
    without ``sequential_refresh`` are refused naming the field and the fix; EMMET with
    ``emmet_lambda: 0`` (exact constraints, a weight cancels) is refused before the model
    loads; a cell of ``replay+refresh=4`` is written and collected under that mode."""
    from easyedit_replay.cli import _check_modes, parse_modes
    from easyedit_replay.errors import ReplayError

    assert parse_mode("replay+refresh=4")[1] == {"sequential_refresh": True, "sequential_refresh_weight": 4.0}
    assert parse_mode("replay+refresh")[1] == {"sequential_refresh": True}  # the weight left at its default 1
    assert parse_mode("replay_tau=0.5+norm_anchor+refresh=0.25")[1] == {
        "replay_tau": 0.5, "norm_anchor": True, "sequential_refresh": True, "sequential_refresh_weight": 0.25}
    assert mode_spec("replay + refresh = 4.0") == "replay+refresh=4"
    assert mode_spec("replay+refresh=1.0") == "replay+refresh"
    assert mode_spec("spread+refresh=1e6") == "spread+refresh=1e06"  # no '+': it separates options
    assert mode_spec("spread+refresh=1234567") == "spread+refresh=1234567"  # %g would round it
    for spec in ("spread+refresh=1e6", "spread+refresh=1234567", "replay+refresh=0.1234567"):
        assert parse_mode(mode_spec(spec)) == parse_mode(spec), spec
    assert parse_modes("spread, replay+refresh=4.0,replay+refresh") == ("spread", "replay+refresh=4", "replay+refresh")
    range_fix = "option refresh={}: sequential_refresh_weight must be a positive finite number"
    for value in ("0", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match=range_fix.format(value)):
            parse_mode(f"replay+refresh={value}")
    with pytest.raises(ValueError, match="option refresh='x': not a number \\(e.g. refresh=4\\)"):
        parse_mode("replay+refresh=x")
    with pytest.raises(ValueError, match="option 'rekeyed' takes no value; write '\\+rekeyed'"):
        parse_mode("replay+rekeyed=2")
    with pytest.raises(ValueError, match="option 'refresh' is given twice"):
        parse_mode("replay+refresh+refresh=2")
    with pytest.raises(ValueError, match="param = 'sequential_refresh'"):
        sequential.register_sequential_option(sequential.SequentialOption(
            "bad", {"sequential_refresh": True}, "x", param="sequential_refresh"))
    assert "bad" not in sequential.SEQUENTIAL_OPTIONS

    with pytest.raises(HyperParamsError, match="sequential_refresh_weight = 2: .*set sequential_refresh: true"):
        _hp(stats_dir, "MEMIT", sequential_refresh_weight=2)
    for value in (0, -1.0, float("nan"), float("inf"), True, "four"):
        with pytest.raises(HyperParamsError, match="sequential_refresh_weight = .*positive finite number"):
            _hp(stats_dir, "MEMIT", sequential_refresh=True, sequential_refresh_weight=value)
    assert _hp(stats_dir, "MEMIT", sequential_refresh=True, sequential_refresh_weight=4).sequential_refresh_weight == 4

    emmet = {"EMMET": _hp(stats_dir, "EMMET", emmet_lambda=0)}
    _check_modes(emmet, ("replay+refresh",))  # at weight 1 the stock relaxation does not matter
    with pytest.raises(ReplayError, match="--modes replay\\+refresh=4 with EMMET: sequential_refresh_weight = 4.0 "
                                          "with EMMET: with emmet_lambda 0 every row"):
        _check_modes(emmet, ("replay+refresh=4",))
    _check_modes({"EMMET": _hp(stats_dir, "EMMET"), "MEMIT": _hp(stats_dir, "MEMIT"),
                  "AlphaEdit": _hp(stats_dir, "AlphaEdit")}, ("spread+refresh=4", "replay+refresh=4"))

    path = cells.step_path(tmp_path, 2, 4, "MEMIT", "replay+refresh=4", 1)
    assert path.parent.name == "MEMIT__replay+refresh=4"
    cells.write_cell(path, {"kind": "sequential", "alg": "MEMIT", "mode": "replay+refresh=4", "batch_size": 2,
                            "total": 4, "step": 1}, {})
    assert list(cells.collect_cells(tmp_path)["sequential"][(2, 4)]) == ["MEMIT/replay+refresh=4"]


def test_emmet_row_weights_are_a_relaxation():
    """EMMET's solve with columns multiplied by ``sqrt(w)`` is the weighted least squares
    ``R W K^T (K W K^T + emmet_lambda C')^-1`` (so a weight relaxes those rows' constraint
    to ``emmet_lambda / w``), and with ``emmet_lambda = 0`` the weights cancel (why a weight
    is refused there)."""
    from easyedit_replay.algorithms.emmet import emmet_solve

    gen = torch.Generator().manual_seed(0)
    d_in, d_out, m = 8, 5, 4
    a = torch.randn(d_in, 3 * d_in, generator=gen, dtype=torch.float64)
    cov = a @ a.T / (3 * d_in)
    keys = torch.randn(d_in, m, generator=gen, dtype=torch.float64)
    resid = torch.randn(d_out, m, generator=gen, dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 4.0, 4.0], dtype=torch.float64)  # the last two: earlier edits, weighted 4
    scaled = emmet_solve(keys * w.sqrt(), resid * w.sqrt(), cov, 1.0, 0, 0.1)
    weighted = resid @ torch.diag(w) @ keys.T @ torch.linalg.inv(keys @ torch.diag(w) @ keys.T + 0.1 * cov)
    assert torch.allclose(scaled, weighted, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(scaled, emmet_solve(keys, resid, cov, 1.0, 0, 0.1), rtol=1e-3)
    exact = emmet_solve(keys, resid, cov, 1.0, 0, 0)
    assert torch.allclose(emmet_solve(keys * w.sqrt(), resid * w.sqrt(), cov, 1.0, 0, 0), exact, rtol=1e-8, atol=1e-10)


def _refreshed(model, tok, records, hp, mode="replay"):
    """Edit ``records[:2]`` then ``records[2:4]`` with ``hp`` (``sequential_refresh``) into a
    fresh record, weights restored after. Returns both plans, the mean distance of the
    first batch's states at every edit layer after both batches to the states the record
    holds for them (what the second solve restores), the rule's ``(keys, error, restored)``
    at each site of the second batch, the ``(rows, weight)`` of every :func:`_weigh_rows`
    call, and AlphaEdit's cache after each batch ``{weight: (after 1, after 2)}``."""
    from unittest import mock

    from easyedit_replay import editor

    sequential.reset_sequential_state(model)
    reset_alphaedit_cache(model)
    rule = get_algorithm(hp.alg_name).rule
    seen, weighed = [], []
    real_update, real_weigh = rule.update, editor._weigh_rows

    def spy(inp):
        seen.append((inp.keys.clone(), inp.error.clone(), inp.restored))
        return real_update(inp)

    def weigh(*args):
        weighed.append(args[1:])
        return real_weigh(*args)

    params = {n: resolve_parameter(model, n) for n in weight_names(hp)}
    with mock.patch.object(rule, "update", spy), mock.patch.object(editor, "_weigh_rows", weigh), \
            weight_transaction(params, restore_always=True):
        first = compute_edit(model, tok, records[:2], hp, mode, context_templates=TEMPLATES)
        apply_plan(model, first, hp)
        assert not weighed  # nothing earlier in the first batch's solve
        cache = alphaedit_cache(model)
        del seen[:]
        second = compute_edit(model, tok, records[2:4], hp, mode, context_templates=TEMPLATES)
        apply_plan(model, second, hp)
        now = _block_states(model, tok, first.requests, hp)
        cache = {n: (c, alphaedit_cache(model)[n]) for n, c in cache.items()}
    recorded = torch.stack([first.sequential.states[layer] for layer in hp.layers])
    gap = float((now - recorded).norm(dim=-1).mean())
    return first, second, gap, seen, weighed, cache


@pytest.mark.parametrize("alg", ["MEMIT", "AlphaEdit"])
def test_refresh_weight_holds_the_earlier_edits(model_tok, stats_dir, demo_records, fresh, alg):
    """``sequential_refresh_weight`` (real model, layers 7-8, 2 + 2 edits): at 1 the edit is
    plain ``+refresh`` bit for bit and nothing is multiplied; at 100 the first batch is
    unchanged (nothing earlier), the second batch's first solve gets its own rows as at 1
    and the earlier rows times 10 (``sqrt(100)``), exactly; the earlier batch's residual
    to the states it reached, after the second batch, is smaller (MEMIT: under half),
    and AlphaEdit's cache still grows by the second batch's own 2 keys only, unweighted."""
    model, tok = model_tok
    base = dict(layers=(7, 8), sequential_refresh=True)
    plain = _refreshed(model, tok, demo_records, _hp(stats_dir, alg, **base))
    one = _refreshed(model, tok, demo_records, _hp(stats_dir, alg, **base, sequential_refresh_weight=1.0))
    heavy = _refreshed(model, tok, demo_records, _hp(stats_dir, alg, **base, sequential_refresh_weight=100))
    names = sorted(plain[0].updates)
    for k in (0, 1):
        assert all(torch.equal(plain[k].updates[n], one[k].updates[n]) for n in names)
    assert not plain[4] and not one[4]  # _weigh_rows only at w != 1: on keys and residuals of every site
    assert heavy[4] == [(2, 100)] * (2 * len(names)), heavy[4]
    assert all(torch.equal(plain[0].updates[n], heavy[0].updates[n]) for n in names)
    assert not any(torch.equal(plain[1].updates[n], heavy[1].updates[n]) for n in names)
    (k1, e1, r1), (k100, e100, r100) = plain[3][0], heavy[3][0]  # the first edit layer: same model, same reads
    assert r1 == r100 == 2 and k1.shape[1] == 4
    assert torch.equal(k100[:, :2], k1[:, :2]) and torch.equal(e100[:, :2], e1[:, :2])
    assert torch.equal(k100[:, 2:], k1[:, 2:] * 10) and torch.equal(e100[:, 2:], e1[:, 2:] * 10)
    assert heavy[2] < (0.5 if alg == "MEMIT" else 0.8) * plain[2], (heavy[2], plain[2])
    if alg == "AlphaEdit":  # the cache grows by the second batch's own keys, unweighted, not by the earlier rows
        for (keys, _, _), n in zip(heavy[3], names):
            after_first, after_second = heavy[5][n]
            own = keys[:, :2].float()
            assert torch.allclose(after_second - after_first, own @ own.T, atol=1e-4), n
        assert all(torch.isfinite(heavy[1].updates[n]).all() for n in names)


def test_attribution_steps_are_checked_before_the_model_loads(tmp_path, capsys):
    assert main(["scale", "--plan-only", "--n", "4", "--sequential", "--batch-size", "2", "--algs", "MEMIT",
                 "--modes", "replay+rekeyed", "--attribution", "3", "--out", str(tmp_path)]) == 2
    assert "--attribution 3: steps of a --sequential series that have an earlier batch, in 2..2" in capsys.readouterr().err
    assert main(["scale", "--plan-only", "--n", "4", "--sequential", "--batch-size", "2", "--algs", "MEMIT",
                 "--modes", "spread,replay+rekeyed", "--attribution", "2", "--out", str(tmp_path)]) == 0
    planned = json.loads((tmp_path / "scale.json").read_text())["planned"]
    assert sorted({c["mode"] for c in planned}) == ["replay+rekeyed", "spread"]


CANDIDATES = {"MEMIT": ("replay+old_keys", "replay+rekeyed", "replay+norm_anchor", "replay_tau=0.5", "replay_capacity",
                        "replay+refresh"),
              "AlphaEdit": ("replay+rekeyed",)}
ATTRIBUTED = "AlphaEdit"  # the restore-one-layer attribution at step 2 (it costs evaluations)


def _run_candidates(model, tok, records, stats_dir, out):
    for alg, modes in CANDIDATES.items():
        cfg = ScaleConfig(sizes=[4], modes=modes, sequential=True, batch_size=2, curve=True, fluency=False, n_boot=50,
                          progress=False, attribution=[2] if alg == ATTRIBUTED else [])
        run_scale(model, tok, records, {alg: _hp(stats_dir, alg, (7, 8))}, cfg, out, report=alg == ATTRIBUTED)


def test_every_candidate_runs_in_sequence_and_resumes(model_tok, stats_dir, demo_records, fresh, tmp_path,
                                                      monkeypatch):
    """Each candidate through ``scale --sequential`` (2 x 2 edits, layers 7 and 8): a run
    stopped after each series' first step cell resumes, series after series, to the
    cells of an uninterrupted run. Each step cell carries the norms relative to the
    unedited model and the key drift of the batches made (batch 1's layer-8 keys moved
    by batch 2's layer-7 update, its layer-7 keys not); AlphaEdit's step 2 carries the
    attribution, whose efficacy of batch 1 with every weight set back is the one batch 1
    had after step 1; the report shows the new tables."""
    model, tok = model_tok
    records = demo_records[:4]
    reference = tmp_path / "reference"
    _run_candidates(model, tok, records, stats_dir, reference)

    resumed = tmp_path / "resumed"
    real_write = scale.write_cell

    def stop_after_first_step(path, cell, settings):
        real_write(path, cell, settings)
        if cell["kind"] == "sequential" and cell["step"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(scale, "write_cell", stop_after_first_step)
    stops = 0
    while True:
        try:
            _run_candidates(model, tok, records, stats_dir, resumed)
            break
        except KeyboardInterrupt:
            stops += 1
            assert sequential.edited_batches(model) == []  # the stop left no record behind
            assert len(list(resumed.glob("cells/seq_*/*/step001.json"))) == stops
    assert stops == sum(len(modes) for modes in CANDIDATES.values())
    assert _cells(resumed) == _cells(reference)

    series = cells.collect_cells(reference)["sequential"][(2, 4)]
    assert sorted(series) == sorted(f"{a}/{m}" for a, modes in CANDIDATES.items() for m in modes)
    for key, (one, two) in series.items():
        assert one["sequential"]["norms"]["anchor"] and one["sequential"]["norms"]["targets"], key
        assert list(one["sequential"]["key_drift"]) == ["1"] and list(two["sequential"]["key_drift"]) == ["1", "2"]
        drift = two["sequential"]["key_drift"]["1"]
        assert drift["model.layers.7.mlp.down_proj.weight"]["relative_change"] < 1e-5, key
        assert drift["model.layers.8.mlp.down_proj.weight"]["relative_change"] > 1e-4, key
        assert ("attribution" in two["sequential"]) == key.startswith(ATTRIBUTED), key
    one, two = series[f"{ATTRIBUTED}/replay+rekeyed"]
    attribution = two["sequential"]["attribution"]["1"]
    assert sorted(attribution["restored"]) == ["model.layers.7.mlp.down_proj.weight",
                                               "model.layers.8.mlp.down_proj.weight"]
    assert attribution["after_batch"]["efficacy_exact"] == sum(r["efficacy_exact"] for r in one["per_edit"][:2]) / 2
    assert attribution["after_batch"]["logp_new"] == pytest.approx(
        sum(r["logp_new"] for r in one["per_edit"][:2]) / 2, abs=1e-4)
    norm_anchored = series["MEMIT/replay+norm_anchor"][0]
    assert norm_anchored["sequential"]["norms"]["anchor"]["model.layers.7"]["delta"] > 0
    assert norm_anchored["analysis"]["norm_anchor"]["7/model.layers.{}"]["not_edited"] == 0
    report = (reference / "report.md").read_text()
    for line in ("| AlphaEdit | replay+rekeyed | 2 | 1 |", "| MEMIT | replay+rekeyed | 2 | 0.0000 |",
                 "key drift layer 8", "\\|delta\\| layer 7"):
        assert line in report, line
