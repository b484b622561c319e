"""Operating points: the named SmolLM2 YAMLs carry the values they claim and name their
source, anchors of one point are a miss at another, the tuning split is disjoint from
every evaluation prefix, and the selection rule picks as written."""

from __future__ import annotations

import json
import logging

import pytest

from easyedit_replay.algorithms import load_hparams
from easyedit_replay.bundled import POINT_FIELDS
from easyedit_replay.cli import OPERATING_POINTS, default_hparams_path, main, parse_records
from easyedit_replay.errors import ReplayError
from easyedit_replay.prompts import prepare_requests
from easyedit_replay.tune import EVALUATION_PREFIX, SCREENING_SPLITS, TUNING_SPLITS, pick

from .conftest import ROOT, SHARED_DATA, requires_shared
from .test_core import with_fields

ALGS = ("MEMIT", "PMET", "EMMET", "AlphaEdit")
# POINT_FIELDS (clamp_norm_factor, v_lr, v_weight_decay, v_num_grad_steps) and the file each point's values come from
EXPECTED = {
    "bundled": ((4, 0.5, 1e-3, 25), "hparams/MEMIT/llama-7b.yaml"),
    "paper": ((0.75, 0.1, 0.5, 35), "jugechengzi/FE configs/llms/llama3-8b.yaml"),
    "host-fe": ((4, 0.1, 0.5, 25), "hparams/MEMIT-FE/llama3-8b.yaml"),
}


@pytest.mark.parametrize("point", OPERATING_POINTS)
@pytest.mark.parametrize("alg", ALGS)
def test_point_yaml_carries_its_values_and_source(alg, point):
    hp = load_hparams(default_hparams_path("smollm2-135m", f"{alg}_REPLAY", point))
    values, source = EXPECTED[point]
    assert tuple(getattr(hp, f) for f in POINT_FIELDS) == values
    assert hp.operating_point == point
    assert source in hp.hparams_source
    bundled = load_hparams(default_hparams_path("smollm2-135m", f"{alg}_REPLAY"))
    # everything but the anchor settings and the labels is the bundled YAML's
    same = {k: v for k, v in hp.to_dict().items() if k not in POINT_FIELDS + ("operating_point", "hparams_source")}
    assert same == {k: v for k, v in bundled.to_dict().items() if k in same}


def test_point_and_hparams_together_are_refused(capsys):
    code = main(["compare", "--hparams", str(default_hparams_path()), "--point", "paper", "--n", "1"])
    assert code == 2
    assert "--point paper picks a bundled YAML" in capsys.readouterr().err


def test_anchors_of_one_point_miss_at_another(model_tok, demo_records, stats_dir, tmp_path, monkeypatch, caplog):
    from easyedit_replay.anchors import Objective, optimize_anchors

    monkeypatch.setenv("EASYEDIT_REPLAY_ANCHOR_CACHE", str(tmp_path / "anchors"))
    model, tok = model_tok
    reqs = prepare_requests(demo_records[:1])
    templates = [["{}"]]

    def log_of(point):
        hp = with_fields(load_hparams(default_hparams_path("smollm2-135m", "MEMIT_REPLAY", point),
                                      stats_dir=stats_dir), v_num_grad_steps=2)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="easyedit_replay.anchors"):
            optimize_anchors(model, tok, reqs, Objective.of(hp, hp.layers[0], [hp.layer_module_tmp], templates),
                             chunk_size=hp.anchor_batch_size)
        return caplog.text

    assert "1 optimized" in log_of("bundled")
    assert "1 loaded from the cache" in log_of("bundled")
    assert "0 loaded from the cache, 1 optimized" in log_of("paper")  # clamp, lr, decay differ
    assert "0 loaded from the cache, 1 optimized" in log_of("host-fe")  # lr, decay differ
    assert "1 loaded from the cache" in log_of("paper")


def test_records_slice_parsing():
    assert parse_records("1823:1919") == slice(1823, 1919)
    assert parse_records("-96:") == slice(-96, None)
    assert parse_records(None) is None
    for bad in ("12", "a:b", "1:2:3"):
        with pytest.raises(ReplayError, match="--records"):
            parse_records(bad)
    assert parse_records("1823:1919,1535:1823") == (slice(1823, 1919), slice(1535, 1823))
    with pytest.raises(ReplayError, match="--records"):
        parse_records("1:2,x")


def test_records_ranges_keep_their_order_and_file_positions():
    """Comma-separated ranges select in the order given (a sequence whose first batch is
    the first range) and each record keeps its position in the file; overlaps are refused."""
    from easyedit_replay.data import load_records

    whole = load_records()
    picked = load_records(records=parse_records("4:8,0:4"))
    assert [r["prompt"] for r in picked] == [r["prompt"] for r in whole[4:8] + whole[0:4]]
    assert [r["case_id"] for r in picked] == [r["case_id"] for r in whole[4:8] + whole[0:4]]
    with pytest.raises(ReplayError, match="overlap"):
        load_records(records=parse_records("0:4,2:6"))


@requires_shared
@pytest.mark.parametrize("name,folder", [("counterfact-val.json", "counterfact"), ("zsre-1k.json", "zsre")])
def test_tuning_split_is_disjoint_from_evaluation_prefixes(name, folder):
    """The ranges the tuning command uses (TUNING_SPLITS, the README's `tune --records`)
    and the sequential screening ranges (SCREENING_SPLITS) hold no record of any
    evaluated prefix (at most EVALUATION_PREFIX records)."""
    from easyedit_replay.data import load_records

    path = SHARED_DATA / folder / name
    start, end = TUNING_SPLITS[name]
    tuning = load_records(path, records=slice(start, end))
    evaluation = load_records(path, EVALUATION_PREFIX)
    assert len(tuning) == end - start and start >= EVALUATION_PREFIX
    assert end == len(json.loads(path.read_text()))  # counted from the end of the file
    key = lambda r: (r["case_id"], r["prompt"], r["target_new"])  # noqa: E731
    assert not {key(r) for r in tuning} & {key(r) for r in evaluation}
    screening = load_records(path, records=parse_records(SCREENING_SPLITS[name]))
    assert [key(r) for r in screening[: end - start]] == [key(r) for r in tuning]  # the tuning split comes first
    assert not {key(r) for r in screening} & {key(r) for r in evaluation}


@pytest.mark.parametrize("grid, name", [("tune_cf", "counterfact-val.json"), ("tune_zsre", "zsre-1k.json")])
def test_committed_grids_ran_on_the_tuning_split(grid, name):
    """Every cell folder of a committed operating-point grid (docs/results/tune_cf, and
    docs/results/tune_zsre, the ZsRE check) names its data file and that file's
    TUNING_SPLITS range in its ``meta``: the grids saw no evaluated record."""
    plans = sorted((ROOT / "docs" / "results" / grid).glob("*/lambda*/scale.json"))
    assert plans, grid
    start, end = TUNING_SPLITS[name]
    for plan in plans:
        meta = json.loads(plan.read_text())["meta"]
        assert (meta["data"].rsplit("/", 1)[-1], meta["records"]) == (name, f"{start}:{end}"), plan


def _row(point, lam, alg, mode, eff, gen, dkl):
    return {"point": point, "lambda": float(lam), "alg": alg, "mode": mode, "eff_acc": eff, "gen_acc": gen,
            "dkl": dkl, "score": (eff + gen) / 2, "update_norm": {}}


def test_rule_picks_the_best_admissible_spread_point():
    rows = []
    for alg in ("MEMIT", "EMMET", "AlphaEdit"):
        rows += [_row("bundled", 5000, alg, "spread", 0.9, 0.3, 0.05),
                 _row("bundled", 1000, alg, "spread", 1.0, 0.5, 0.09),  # better score, DKL too high
                 _row("paper", 5000, alg, "spread", 0.3, 0.0, 0.01),
                 _row("host-fe", 15000, alg, "spread", 0.95, 0.4, 0.04),
                 _row("bundled", 5000, alg, "replay", 1.0, 0.3, 0.05),
                 _row("paper", 5000, alg, "replay", 1.0, 0.4, 0.02)]
    chosen = pick(rows)
    assert chosen["point"] == "host-fe"
    assert chosen["lambda"] == {"MEMIT": 15000.0, "EMMET": 15000.0, "AlphaEdit": 15000.0}
    assert chosen["best"][("MEMIT", "replay")]["point"] == "paper"
    # a tie within 0.005 goes to the bundled point
    tied = [dict(r, eff_acc=0.9, gen_acc=0.3, score=0.6) if r["point"] == "host-fe" else r for r in rows]
    assert pick(tied)["point"] == "bundled"
