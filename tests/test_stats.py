"""Covariance statistics: EasyEdit's npz layout, one pass == per-layer, cache behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from easyedit_replay.errors import StatisticsError
from easyedit_replay.stats import (
    BUNDLED, bundled_texts, collect_second_moments, context_length, load_second_moment, model_stats_name,
    sample_indices, save_second_moment, second_moments, stats_path,
)

from .conftest import SHARED_DATA, requires_shared


def test_npz_round_trip_in_easyedit_layout(tmp_path):
    mom2 = torch.randn(6, 6, dtype=torch.float32)
    path = tmp_path / "m" / "x_stats" / "model.layers.3.mlp.down_proj_float32_mom2_100.npz"
    save_second_moment(path, 1234, mom2, 100)
    with np.load(path) as data:
        assert sorted(data.files) == ["mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"]
        assert str(data["mom2.constructor"]) == "easyeditor.util.runningstats.SecondMoment()"
        assert int(data["sample_size"]) == 100 and data["mom2.mom2"].dtype == np.float32
    count, back = load_second_moment(path, 6, "float32", 100)
    assert count == 1234 and torch.equal(back, mom2)
    with pytest.raises(StatisticsError, match="expected \\[5, 5\\]"):
        load_second_moment(path, 5, "float32", 100)
    with pytest.raises(StatisticsError, match="dtype float32, expected float64"):
        load_second_moment(path, 6, "float64", 100)
    with pytest.raises(StatisticsError, match="sample_size=100, not 7"):
        load_second_moment(path, 6, "float32", 7)
    assert not list(path.parent.glob("*.tmp*"))  # atomic write leaves no temporary file


def test_stats_path_matches_easyedit(model_tok):
    model, _ = model_tok
    assert model_stats_name(model) == "SmolLM2-135M-Instruct"
    npos = context_length(model)
    assert npos == 8192
    p = stats_path("data/stats", "SmolLM2-135M-Instruct", "wikipedia", "model.layers.4.mlp.down_proj", "float32", 100000, None, npos)
    assert str(p) == "data/stats/SmolLM2-135M-Instruct/wikipedia_stats/model.layers.4.mlp.down_proj_float32_mom2_100000.npz"
    p = stats_path("s", "m", "d", "mod", "float32", 10, 256, npos)
    assert p.name == "mod_float32_mom2_t256_10.npz"


def test_sample_indices_mirror_easyedit_sampler():
    import random

    expected = list(range(50))
    random.Random(1).shuffle(expected)
    assert sample_indices(50, 10) == expected[:10]
    small = list(range(5))
    random.Random(1).shuffle(small)
    assert sample_indices(5, 10) == small  # sample_size > len: the whole shuffled set


def test_one_pass_equals_per_layer(model_tok):
    model, tok = model_tok
    texts = bundled_texts()[:24]
    mods = ["model.layers.2.mlp.down_proj", "model.layers.5.mlp.down_proj"]
    joint = collect_second_moments(model, tok, texts, mods, maxlen=128, progress=False)
    for m in mods:
        alone = collect_second_moments(model, tok, texts, [m], maxlen=128, progress=False)[m]
        assert joint[m][0] == alone[0] > 500
        assert torch.equal(joint[m][1], alone[1])
    # The two layers really differ (the test would catch a mix-up).
    assert not torch.allclose(joint[mods[0]][1], joint[mods[1]][1])
    # Hand check: the second moment is the sum of k k^T over non-padding tokens.
    ids = tok(texts[0])["input_ids"][:128]
    seen = {}
    h = model.get_submodule(mods[0]).register_forward_hook(lambda m, a, o: seen.__setitem__("k", a[0][0].detach()))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    h.remove()
    single = collect_second_moments(model, tok, texts[:1], mods[:1], maxlen=128, progress=False)[mods[0]]
    assert single[0] == len(ids)
    k = seen["k"]
    assert torch.allclose(single[1], k.T @ k, rtol=1e-4, atol=1e-3)


def test_second_moments_cache_reuse_and_bad_file(model_tok, hparams, tmp_path):
    model, tok = model_tok
    hp = hparams.replace(mom2_n_samples=16, layers=[3, 4], stats_dir=str(tmp_path))
    mods = ["model.layers.3.mlp.down_proj", "model.layers.4.mlp.down_proj"]
    first = second_moments(model, tok, hp, mods, progress=False)
    files = sorted(tmp_path.rglob("*.npz"))
    assert [f.name for f in files] == [f"{m}_float32_mom2_16.npz" for m in mods]
    assert files[0].parent.name == f"{BUNDLED}_stats"
    from easyedit_replay import stats as stats_mod

    stats_mod.clear_memory_cache()
    again = second_moments(model, tok, hp, mods, progress=False)  # from the files
    for m in mods:
        assert torch.equal(first[m], again[m])
        assert first[m].shape == (1536, 1536)
        assert torch.allclose(first[m], first[m].T)
    # A cache file of the wrong shape is reported, never used.
    save_second_moment(files[0], 10, torch.eye(7), 16)
    stats_mod.clear_memory_cache()
    with pytest.raises(StatisticsError, match="delete it to recompute"):
        second_moments(model, tok, hp, mods, progress=False)
    stats_mod.clear_memory_cache()


@requires_shared
def test_local_text_corpus_from_shared_wikitext(model_tok, hparams, tmp_path):
    model, tok = model_tok
    path = SHARED_DATA / "wikitext-2" / "valid.txt"
    hp = hparams.replace(mom2_dataset=str(path), mom2_n_samples=20, mom2_batch_tokens=64, layers=[3],
                         stats_dir=str(tmp_path))
    cov = second_moments(model, tok, hp, ["model.layers.3.mlp.down_proj"], progress=False)["model.layers.3.mlp.down_proj"]
    (f,) = tmp_path.rglob("*.npz")
    assert f.parent.name == "valid_stats" and f.name.endswith("_t64_20.npz")
    count, _ = load_second_moment(f)
    assert 0 < count <= 20 * 64
    assert torch.isfinite(cov).all() and float(cov.trace()) > 0
