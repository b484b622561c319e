"""Anchor disk cache (hits, misses, bad files, two writers), the loop from the anchor
layer vs the full forward pass, and the fail-fast checks of ``compare``."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time

import pytest
import torch

from easyedit_replay.anchors import Objective, forward as forward_mod, optimize_anchors
from easyedit_replay.anchors.store import AnchorStore, forget_fingerprints
from easyedit_replay.prompts import prepare_requests

from .conftest import ROOT
from .test_core import with_fields

TEMPLATES = [["{}"], ["The following is true. {}"]]


@pytest.fixture()
def anchor_dir(tmp_path, monkeypatch):
    """A private anchor cache for the test."""
    d = tmp_path / "anchors"
    monkeypatch.setenv("EASYEDIT_REPLAY_ANCHOR_CACHE", str(d))
    return d


def _files(d):
    return sorted(d.rglob("*.safetensors"))


def _contents(path):
    """Metadata and tensor bytes of a safetensors file (its header order is not fixed)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def _optimize(model, tok, hp, reqs, **kw):
    objective = Objective.of(hp, hp.layers[0], [hp.layer_module_tmp], TEMPLATES)
    return optimize_anchors(model, tok, reqs, objective, chunk_size=hp.anchor_batch_size, **kw)


def test_hit_gives_bit_identical_updates(model_tok, hparams, demo_records, anchor_dir, caplog):
    from easyedit_replay.editor import compute_edit

    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=3)
    recs = demo_records[:2]
    fresh = compute_edit(model, tok, recs, with_fields(hp, anchor_cache=False), "replay", context_templates=TEMPLATES)
    assert not _files(anchor_dir)  # the off switch writes nothing
    with caplog.at_level(logging.INFO, logger="easyedit_replay.anchors"):
        cold = compute_edit(model, tok, recs, hp, "replay", context_templates=TEMPLATES)
        assert "0 loaded from the cache, 2 optimized" in caplog.text
        caplog.clear()
        start = time.perf_counter()
        warm = compute_edit(model, tok, recs, hp, "replay", context_templates=TEMPLATES)
        print(f"warm compute_edit {time.perf_counter() - start:.2f} s")
        assert "2 loaded from the cache, 0 optimized" in caplog.text
    assert len(_files(anchor_dir)) == 2  # one file per request
    assert torch.equal(warm.anchor.delta, cold.anchor.delta) and torch.equal(warm.anchor.init, cold.anchor.init)
    assert torch.equal(warm.anchor.steps, cold.anchor.steps)
    for plan in (cold, warm):
        assert plan.updates.keys() == fresh.updates.keys()
        for name, upd in fresh.updates.items():
            assert torch.equal(plan.updates[name], upd), name
    # A run over more requests reuses the ones it shares.
    with caplog.at_level(logging.INFO, logger="easyedit_replay.anchors"):
        caplog.clear()
        _optimize(model, tok, hp, prepare_requests(demo_records[:3]))
        assert "2 loaded from the cache, 1 optimized" in caplog.text


def test_anchors_banked_in_shards_are_all_hits_for_the_edit(model_tok, hparams, demo_records, anchor_dir, caplog):
    """``easyedit-replay anchors bank``'s mechanism: ``compute_anchors`` on disjoint shards of
    the requests writes exactly the keys a later ``compute_edit`` of all of them looks up,
    and the edit then gets the banked anchors (no optimization, same deltas)."""
    from easyedit_replay.anchors import bank
    from easyedit_replay.editor import compute_anchors, compute_edit
    from easyedit_replay.errors import ReplayError

    assert bank.shard_indices(5, "1/2") == [0, 2, 4] and bank.shard_indices(5, "2/2") == [1, 3]
    with pytest.raises(ReplayError, match="--shard '3/2'"):
        bank.shard_indices(5, "3/2")

    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=2)
    recs = demo_records[:3]
    shards = [compute_anchors(model, tok, [recs[i] for i in bank.shard_indices(3, f"{j}/2")], hp, "replay",
                              context_templates=TEMPLATES) for j in (1, 2)]
    assert [sorted(a) for a in shards] == [[hp.layers[0]], [hp.layers[0]]]
    assert len(_files(anchor_dir)) == 3
    with caplog.at_level(logging.INFO, logger="easyedit_replay.anchors"):
        plan = compute_edit(model, tok, recs, hp, "replay", context_templates=TEMPLATES)
        assert "3 loaded from the cache, 0 optimized" in caplog.text
    banked = torch.cat([shards[0][hp.layers[0]].delta[:, :1], shards[1][hp.layers[0]].delta[:, :1],
                        shards[0][hp.layers[0]].delta[:, 1:]], dim=1)  # requests 0, 1, 2
    assert torch.equal(plan.anchors[hp.layers[0]].delta, banked)


def test_changed_inputs_miss(model_tok, hparams, demo_records, anchor_dir, caplog):
    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=2)
    reqs = prepare_requests(demo_records[:1])
    _optimize(model, tok, hp, reqs)
    assert len(_files(anchor_dir)) == 1

    def misses(hp_, reqs_):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="easyedit_replay.anchors"):
            _optimize(model, tok, hp_, reqs_)
        return "0 loaded from the cache, 1 optimized" in caplog.text

    assert not misses(hp, reqs)  # same inputs: a hit
    assert misses(with_fields(hp, v_lr=0.25), reqs)
    assert misses(with_fields(hp, kl_factor=0.5), reqs)
    other = prepare_requests([{**demo_records[0], "prompt": demo_records[0]["prompt"] + " the"}])
    assert misses(hp, other)
    assert not misses(with_fields(hp, anchor_batch_size=3), reqs)  # float rounding only: not keyed
    w = model.get_parameter("model.layers.20.mlp.up_proj.weight")
    before = w[0, 0].clone()
    try:
        with torch.no_grad():
            w[0, 0] += 1e-3  # one weight, in place, far from the anchor layer
        assert misses(hp, reqs)
    finally:
        with torch.no_grad():
            w[0, 0] = before
    assert not misses(hp, reqs)  # restored weights: the first file is found again


def test_recorded_fingerprint_serves_the_anchors_banked_for_the_recorded_weights(model_tok, hparams, demo_records,
                                                                                   anchor_dir, caplog):
    """A resumed series on another machine: weights whose bytes differ from the recorded
    ones by one ulp miss the bank, but inside ``recorded_as(model, recorded)`` they are
    served the anchors banked for the recorded weights (the same delta), and only the
    weights as they were at entry: a write inside the block, and the block's end, key
    by the weights' own fingerprint again."""
    from easyedit_replay.anchors.store import anchor_fingerprint, model_fingerprint, recorded_as

    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=2)
    reqs = prepare_requests(demo_records[:1])
    recorded_fp = model_fingerprint(model)
    banked = _optimize(model, tok, hp, reqs)

    def loaded(expected):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="easyedit_replay.anchors"):
            got = _optimize(model, tok, hp, reqs)
        assert f"{expected} loaded from the cache, {1 - expected} optimized" in caplog.text
        return got

    w = model.get_parameter("model.layers.20.mlp.up_proj.weight")
    before = w[0, :2].clone()
    try:
        with torch.no_grad():
            w[0, 0] = torch.nextafter(before[0], before[0] + 1)  # one ulp: float rounding's size
        rounded_fp = model_fingerprint(model)
        assert rounded_fp != recorded_fp
        loaded(0)  # another machine's bytes: a miss
        with recorded_as(model, recorded_fp) as changed:
            assert changed and anchor_fingerprint(model) == recorded_fp
            with recorded_as(model, "f" * len(recorded_fp)):  # an inner block's alias, undone on leaving
                assert anchor_fingerprint(model) == "f" * len(recorded_fp)
            assert torch.equal(loaded(1).delta, banked.delta)
            with torch.no_grad():
                w[0, 1] += 1e-3  # the next batch's write: its weights are its own
            assert anchor_fingerprint(model) == model_fingerprint(model) != recorded_fp
            loaded(0)
        assert anchor_fingerprint(model) == model_fingerprint(model)
        with recorded_as(model, None) as changed:
            assert not changed
    finally:
        with torch.no_grad():
            w[0, :2] = before
        forget_fingerprints(model)
    with recorded_as(model, recorded_fp) as changed:
        assert not changed  # the weights are the recorded ones: nothing to alias


def test_bad_files_are_reported_and_replaced(model_tok, hparams, demo_records, anchor_dir, caplog):
    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=2)
    reqs = prepare_requests(demo_records[:1])
    good = _optimize(model, tok, hp, reqs)
    (path,) = _files(anchor_dir)
    original = path.read_bytes()
    contents = _contents(path)

    path.write_bytes(original[: len(original) // 2])  # truncated: corrupt
    with caplog.at_level(logging.WARNING, logger="easyedit_replay.anchors.store"):
        again = _optimize(model, tok, hp, reqs)
    assert str(path) in caplog.text and "unreadable" in caplog.text
    assert torch.equal(again.delta, good.delta)  # recomputed (same chunking: same bits) ...
    assert _contents(path) == contents  # ... and replaced

    # A valid file whose stored key is another request's.
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["key"] = meta["key"].replace(reqs[0].subject, "Somebody Else")
    tensors = load_file(str(path))
    tensors["delta"] = tensors["delta"] + 1.0
    save_file(tensors, str(path), metadata=meta)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="easyedit_replay.anchors.store"):
        again = _optimize(model, tok, hp, reqs)
    assert str(path) in caplog.text and "does not match" in caplog.text
    assert torch.equal(again.delta, good.delta)  # the poisoned delta was not used
    assert _contents(path) == contents


def test_in_process_layer_serves_the_weights_it_was_opened_on(model_tok, hparams, demo_records, anchor_dir, caplog):
    """Inside ``in_process``, anchors are served from memory under the disk store's key even
    with the disk store off; outside it, or on other weights, they are optimized again."""
    from easyedit_replay.anchors import in_process

    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=2)
    reqs = prepare_requests(demo_records[:2])

    def run():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="easyedit_replay.anchors"):
            return _optimize(model, tok, hp, reqs, cache=False), caplog.text

    with in_process(model) as memory:
        first, log1 = run()
        again, log2 = run()
        w = model.get_parameter("model.layers.20.mlp.up_proj.weight")
        before = w[0, 0].clone()
        try:
            with torch.no_grad():
                w[0, 0] += 1e-3  # other weights: not served, not kept
            _, log3 = run()
        finally:
            with torch.no_grad():
                w[0, 0] = before
    assert "0 loaded from the cache, 2 optimized (in process)" in log1 and len(memory) == 2
    assert "2 loaded from the cache, 0 optimized (in process)" in log2
    assert torch.equal(again.delta, first.delta) and torch.equal(again.init, first.init)
    assert log3 == "" and len(memory) == 2
    assert run()[1] == "" and not _files(anchor_dir)  # outside the block: no cache at all


def _write_same_key(root, seed, out):
    import torch

    from easyedit_replay.anchors.store import AnchorStore, CacheKey, Entry

    store = AnchorStore(root)
    key = CacheKey("ab" * 20, json.dumps({"same": "key"}))
    torch.manual_seed(seed)
    for _ in range(20):
        store.put(key, Entry(torch.randn(1, 8), torch.randn(1, 8), torch.tensor(0.5), torch.tensor(3)))
    out.put("ok")


def test_two_processes_writing_the_same_key_leave_one_valid_file(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_write_same_key, args=(str(tmp_path), s, out)) for s in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert [out.get(timeout=5) for _ in procs] == ["ok", "ok"]
    files = _files(tmp_path)
    assert len(files) == 1 and not list(tmp_path.rglob("*.tmp*"))
    from easyedit_replay.anchors.store import CacheKey

    entry = AnchorStore(tmp_path).get(CacheKey("ab" * 20, json.dumps({"same": "key"})), 1, 8, torch.float32)
    assert entry is not None and entry.delta.shape == (1, 8) and int(entry.steps) == 3


def test_fingerprint_tracks_in_place_writes(model_tok):
    from easyedit_replay.anchors.store import model_fingerprint

    model, _ = model_tok
    forget_fingerprints(model)
    a = model_fingerprint(model)
    start = time.perf_counter()
    assert model_fingerprint(model) == a  # memoized: no re-hash
    assert time.perf_counter() - start < 0.2
    w = model.get_parameter("model.norm.weight")
    with torch.no_grad():
        w[3] += 1.0
    b = model_fingerprint(model)
    with torch.no_grad():
        w[3] -= 1.0
    assert b != a and model_fingerprint(model) == a


BANK = ROOT / "docs" / "results" / "anchors"


def _bank_sample():
    """``[(path, stored key text)]``: the first anchor file of every subfolder of the bank and
    the first of every group (anchor layer, sites, model fingerprint), from the files'
    metadata only."""
    from safetensors import safe_open

    sample, folders, groups = [], set(), set()
    for path in sorted(BANK.glob("*/*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            text = f.metadata()["key"]
        key = json.loads(text)
        group = (key["layer"], tuple(key["sites"]), key["model"])
        if path.parent.name not in folders or group not in groups:
            sample.append((path, text))
            folders.add(path.parent.name)
            groups.add(group)
    return sample


def test_banked_anchors_stay_cache_hits(model_tok, anchor_dir, caplog):
    """Every anchor banked in docs/results/anchors stays a cache hit: for a sample (one file per
    subfolder and per group) the key this code builds - from the bundled YAML through the
    algorithm's objective, the tokenizer's rows and the model's identity (a sequential batch's
    edited weights: their fingerprint) - is the file's digest and description byte for byte,
    the file is a valid entry for it, and the unedited model's anchors load through
    ``optimize_anchors`` with nothing optimized."""
    import shutil
    from dataclasses import replace

    from easyedit_replay.algorithms import get_algorithm, load_hparams
    from easyedit_replay.anchors.objective import rows_by_request
    from easyedit_replay.anchors.store import ModelIdentity, request_keys
    from easyedit_replay.bundled import OPERATING_POINTS, default_hparams_path
    from easyedit_replay.model_info import hidden_size, max_positions
    from easyedit_replay.prompts import EditRequest

    model, tok = model_tok
    unedited = ModelIdentity.of(model)
    yamls = [load_hparams(default_hparams_path("smollm2-135m", alg, point))
             for alg in ("MEMIT_REPLAY", "PMET_REPLAY") for point in OPERATING_POINTS]
    # SmolLM2's anchors (its config); the bank also holds Gemma 3 270M's, which need the gemma extra
    sample = [(path, text) for path, text in _bank_sample() if json.loads(text)["config"] == unedited.config]
    assert sample, "no SmolLM2 anchor in docs/results/anchors"
    hits, live = 0, {}  # live: objective -> requests of the unedited model, for optimize_anchors
    for path, text in sample:
        key = json.loads(text)
        req = EditRequest(**key["request"])
        identity = unedited if key["model"] == unedited.fingerprint else replace(unedited, fingerprint=key["model"])
        for hp in yamls:
            objective = get_algorithm(hp.alg_name).rule.anchor_objective(hp, key["layer"], key["templates"])
            (built,) = request_keys(identity, objective, [req], rows_by_request(tok, [req], objective,
                                                                                max_positions(model)))
            if built.digest == path.stem:
                break
        assert built.digest == path.stem, f"{path.relative_to(ROOT)}: no bundled objective rebuilds its key"
        assert built.description == text  # byte for byte
        entry = AnchorStore(BANK).get(built, len(key["sites"]), hidden_size(model), torch.float32)
        hits += entry is not None
        if identity is unedited:
            live.setdefault(objective, []).append((path, req))
    print(f"banked anchors: {hits} of {len(sample)} sampled files are cache hits "
          f"({len(list(BANK.glob('*/*.safetensors')))} files, {len({p.parent for p, _ in sample})} subfolders); "
          f"{sum(map(len, live.values()))} of them on the unedited model")
    assert hits == len(sample)
    assert live, "no sampled anchor of the unedited model: its fingerprint changed"
    for objective, found in live.items():
        for path, _ in found:
            (anchor_dir / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, anchor_dir / path.parent.name / path.name)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="easyedit_replay.anchors"):
            optimize_anchors(model, tok, [req for _, req in found], objective)
        assert f"{len(found)} loaded from the cache, 0 optimized" in caplog.text


@pytest.mark.parametrize("alg", ["MEMIT_REPLAY", "PMET_REPLAY"])
def test_loop_from_anchor_layer_matches_full_forward(model_tok, stats_dir, demo_records, alg, anchor_dir):
    from easyedit_replay.algorithms import get_algorithm, load_hparams
    from easyedit_replay.cli import default_hparams_path

    model, tok = model_tok
    hp = load_hparams(default_hparams_path(alg=alg), stats_dir=stats_dir, v_num_grad_steps=8)
    rule = get_algorithm(hp.alg_name).rule
    reqs = prepare_requests(demo_records[:2], leading_space=rule.leading_space(model, hp))
    args = (model, tok, reqs, rule.anchor_objective(hp, hp.layers[0], TEMPLATES))
    kw = dict(chunk_size=hp.anchor_batch_size, cache=False)
    fast = optimize_anchors(*args, fast_loop=True, **kw)
    full = optimize_anchors(*args, fast_loop=False, **kw)
    assert len(fast.fast_checks) == 1 and fast.fast_checks[0].agrees, "the fast loop was not used"
    assert not full.fast_checks
    check = fast.fast_checks[0]
    gap = float((fast.delta - full.delta).abs().max())
    rel = gap / float(full.delta.norm(dim=-1).max())
    print(f"{alg}: step-0 loss difference {check.gap:.2e}; max |delta fast - delta full| {gap:.2e} "
          f"= {rel:.2e} of the largest delta norm; steps {fast.steps.tolist()} vs {full.steps.tolist()}")
    # Measured on SmolLM2 (2-core CPU, 2 requests, 8 steps): step-0 loss difference 0 (both);
    # max delta difference 2.4e-7 (4.1e-9 of the largest delta norm) for MEMIT, 0 for PMET
    # (3 requests, 6 steps: 1.1e-5 = 2.4e-7 relative for MEMIT, 2.3e-6 = 9e-8 for PMET).
    # The bound leaves a margin of 40x over the largest relative difference seen.
    assert check.gap <= 1e-5
    assert rel < 1e-5
    assert fast.steps.tolist() == full.steps.tolist()
    assert torch.equal(fast.init, full.init)
    assert torch.allclose(fast.nll, full.nll, rtol=1e-4, atol=1e-5)


def test_fast_loop_falls_back_when_it_disagrees(model_tok, hparams, demo_records, anchor_dir, caplog, monkeypatch):
    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=3)
    reqs = prepare_requests(demo_records[:1])
    real = forward_mod.LayerLoop.forward

    def skewed(self, loss_name, edits):
        h_loss, h_last = real(self, loss_name, edits)
        return h_loss + 1.0, h_last  # (a scale would not do: ln_f is an RMSNorm)

    monkeypatch.setattr(forward_mod.LayerLoop, "forward", skewed)
    with caplog.at_level(logging.WARNING, logger="easyedit_replay.anchors"):
        res = _optimize(model, tok, hp, reqs, cache=False)
    assert "disagrees with the full forward pass" in caplog.text
    (check,) = res.fast_checks
    assert not check.agrees and check.gap > forward_mod.FAST_ATOL  # the gap it fell back on
    monkeypatch.setattr(forward_mod.LayerLoop, "forward", real)
    full = _optimize(model, tok, hp, reqs, cache=False, fast_loop=False)
    assert torch.equal(res.delta, full.delta)  # the full pass was used throughout


# ----------------------------------------------------------------------------- compare fails fast


def _no_model_load(monkeypatch):
    import easyedit_replay.models as models

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", boom)


@pytest.mark.parametrize("content, n, message", [
    (None, None, "file not found"),
    ("{not json", None, "not valid JSON"),
    ("[]", None, "non-empty JSON list"),
    ('[{"foo": 1}]', None, "unknown format"),
    ('[{"prompt": "A is in", "subject": "A", "target_new": "B"}, 3]', None, "item 1 is a int"),
    ('[{"prompt": "A is in", "subject": "A", "target_new": "B"}]', 2, "--n 2"),
    ('[{"prompt": "A is in", "subject": "A", "target_new": "B"}]', 0, "--n 0"),
    ('[{"prompt": "A is in", "subject": "Z", "target_new": "B"}]', None, "does not occur in the prompt"),
    ('[{"prompt": "A is in", "subject": "A", "target_new": ""}]', None, "target_new"),
    ('[{"prompt": "A is in", "subject": "A", "target_new": "B", "rephrase_prompt": 5}]', None, "rephrase_prompt"),
])
def test_compare_fails_fast_on_bad_data(tmp_path, monkeypatch, capsys, content, n, message):
    from easyedit_replay.cli import main

    _no_model_load(monkeypatch)
    path = tmp_path / "edits.json"
    if content is not None:
        path.write_text(content)
    argv = ["compare", "--algs", "MEMIT,PMET", "--data", str(path), "--quiet"] + (["--n", str(n)] if n is not None else [])
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert message in err and str(path) in err, err


def test_compare_fails_fast_on_bad_hparams_and_modes(tmp_path, monkeypatch, capsys):
    from easyedit_replay.cli import main

    _no_model_load(monkeypatch)
    assert main(["compare", "--algs", "MEMIT", "--modes", "spread,backward", "--quiet"]) == 2
    assert "--modes" in capsys.readouterr().err
    bad = tmp_path / "hp.yaml"
    bad.write_text("alg_name: MEMIT_REPLAY\nlayers: [4, 3]\n")
    assert main(["compare", "--hparams", str(bad), "--quiet"]) == 2
    assert "hp.yaml" in capsys.readouterr().err


def test_model_without_hparams_takes_its_bundled_yamls_or_refuses(monkeypatch, capsys):
    """``--model X`` without ``--hparams`` edits with the bundled YAMLs named after X
    (``hparams/<ALG>_REPLAY/X.yaml``), never silently with SmolLM2's; a model with no
    bundled YAML is an error naming ``--hparams``, before any model loads."""
    from easyedit_replay.algorithms import load_hparams
    from easyedit_replay.cli import _prepare, build_parser, main

    from .conftest import ROOT

    ROOT_HPARAMS = ROOT / "hparams"

    _no_model_load(monkeypatch)

    def prepared(*argv):
        prep = _prepare(build_parser().parse_args(["compare", *argv]), 2, load=False)
        return {alg: hp.to_dict() for alg, hp in prep.by_alg.items()}, prep.model_name

    got, model_name = prepared("--model", "/models/llama3-8b/", "--algs", "MEMIT,AlphaEdit")
    assert model_name == "/models/llama3-8b/"
    for alg in ("MEMIT", "AlphaEdit"):
        assert got[alg] == load_hparams(ROOT_HPARAMS / f"{alg}_REPLAY" / "llama3-8b.yaml").to_dict()
    assert got["MEMIT"]["v_loss_layer"] == 31  # not SmolLM2's 29
    assert list(prepared("--model", "qwen3.5-9b")[0]) == ["AlphaEdit"]  # the algorithms with a YAML for it
    smol = load_hparams(ROOT_HPARAMS / "MEMIT_REPLAY" / "smollm2-135m.yaml").to_dict()
    assert prepared("--algs", "MEMIT")[0]["MEMIT"] == smol == prepared("--model", "SmolLM2-135M-Instruct",
                                                                        "--algs", "MEMIT")[0]["MEMIT"]

    assert main(["compare", "--model", "meta-llama/Meta-Llama-3-8B", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--model meta-llama/Meta-Llama-3-8B: no bundled YAML" in err and "pass --hparams" in err
    assert "llama3-8b" in err and "-paper" not in err  # the bundled models are listed, not their operating points
    assert main(["compare", "--model", "smollm2-135m-paper", "--quiet"]) == 2  # a point is not a model: --point paper
    assert "--model smollm2-135m-paper: no bundled YAML" in capsys.readouterr().err
    assert main(["scale", "--model", "gpt2-xl", "--algs", "PMET", "--plan-only", "--out", "unused"]) == 2
    assert "no bundled YAML PMET_REPLAY/gpt2-xl.yaml; pass --hparams" in capsys.readouterr().err
    # --point picks among the named model's YAMLs
    paper = load_hparams(ROOT_HPARAMS / "MEMIT_REPLAY" / "smollm2-135m-paper.yaml").to_dict()
    assert prepared("--model", "smollm2-135m", "--point", "paper", "--algs", "MEMIT")[0]["MEMIT"] == paper
    assert main(["compare", "--model", "llama3-8b", "--point", "paper", "--algs", "MEMIT", "--quiet"]) == 2
    assert "no bundled YAML MEMIT_REPLAY/llama3-8b-paper.yaml" in capsys.readouterr().err
