"""The window axis of ``tune`` (``--windows``): parsing, the folder layout with and without
it, the window rule (``tune.WINDOW_RULE``) on a small synthetic grid, the written-down
Gemma grid of hparams/README.md, and the report without windows unchanged on the
committed SmolLM2 grid. No model is loaded and nothing is edited."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from easyedit_replay.algorithms import load_hparams
from easyedit_replay.cli import OPERATING_POINTS, default_hparams_path, main
from easyedit_replay.errors import ReplayError
from easyedit_replay.targets import get_construction
from easyedit_replay.tune import (
    TUNING_SPLITS, WINDOW_RULE, anchor_layers, check_windows, grid_dir, grid_rows, parse_windows, pick, run_tuning,
    window_hparams, write_tuning_report, yaml_window,
)

ROOT = Path(__file__).resolve().parents[1]
GEMMA_ALGS = ("MEMIT", "EMMET", "AlphaEdit")


def gemma_by_point(points=OPERATING_POINTS):
    return {p: {a: load_hparams(default_hparams_path("gemma3-270m", f"{a}_REPLAY", p)) for a in GEMMA_ALGS}
            for p in points}


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,expected", [
    ("1-4,2-5,4-7", [(1, 2, 3, 4), (2, 3, 4, 5), (4, 5, 6, 7)]),  # windows may share layers
    (" 4-7 , 1-4 ", [(4, 5, 6, 7), (1, 2, 3, 4)]),  # the order given is kept
    ("1,2,3,4;2,3,4,5", [(1, 2, 3, 4), (2, 3, 4, 5)]),
    ("3,4,5,6", [(3, 4, 5, 6)]),
    ("2-5;6,7", [(2, 3, 4, 5), (6, 7)]),
    ("3-3", [(3,)]),
])
def test_windows_parse(text, expected):
    assert parse_windows(text) == expected


@pytest.mark.parametrize("text,why", [
    ("", "no window"),
    ("1-4,,2-5", "an empty window"),
    ("1-4;", "an empty window"),
    ("5-2", "runs backwards"),
    ("1-4,2-5,1-4", "given twice"),
    ("2-5;2,3,4,5", "given twice"),
    ("3,5,6", "not consecutive"),
    ("4,3", "not consecutive"),
    ("1-4,5,6", "mix"),
    ("a-b", "not a layer index"),
    ("1-2-3", "not a layer range"),
    ("-1-3", "not a layer range"),
])
def test_windows_bad_input_names_the_option_and_the_fix(text, why):
    with pytest.raises(ReplayError, match=why) as err:
        parse_windows(text)
    assert str(err.value).startswith("--windows ") and "e.g. 1-4,2-5,4-7" in str(err.value)


def test_window_beyond_the_model_names_the_option_and_the_fix():
    check_windows([(14, 15, 16, 17)], 18)
    check_windows([(40, 41)], None)  # unknown depth: nothing to check
    with pytest.raises(ReplayError, match=r"--windows: the window 15-18 has layer 18, beyond the model's 18 layers "
                                          r"\(0\.\.17\); give windows inside 0-17"):
        check_windows([(1, 2), (15, 16, 17, 18)], 18)


def test_cli_refuses_bad_windows_before_loading_a_model(tmp_path, capsys):
    out = str(tmp_path / "grid")
    assert main(["tune", "--model", "gemma3-270m", "--windows", "5-2", "--out", out]) == 2
    assert "--windows '5-2': the range 5-2 runs backwards" in capsys.readouterr().err
    assert main(["tune", "--model", "gemma3-270m", "--windows", "2-5", "--layers", "2,3", "--out", out]) == 2
    assert "drop --layers" in capsys.readouterr().err
    assert main(["tune", "--model", "gemma3-270m", "--windows", "1-4,4-7", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "window [2, 3, 4, 5] is the rule's reference" in err and "add 2-5" in err
    # --point and --lambda would be overwritten by the grid's axes: refused, not ignored
    assert main(["tune", "--point", "paper", "--out", out]) == 2
    assert "drop --point" in capsys.readouterr().err
    assert main(["tune", "--lambda", "300", "--out", out]) == 2
    assert "--lambdas 1000,300); drop --lambda" in capsys.readouterr().err


def test_tune_help_states_the_defaults_tune_uses():
    """``tune --help`` names the defaults the parser gives tune (``--algs``: the grid's three
    algorithms, not compare's every bundled one), and compare keeps its own."""
    from easyedit_replay.cli import build_parser
    from easyedit_replay.tune import GRID_ALGORITHMS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    tune = parser.parse_args(["tune", "--out", "x"])
    assert tune.algs == "MEMIT,EMMET,AlphaEdit" == ",".join(GRID_ALGORITHMS)
    text = " ".join(sub.choices["tune"].format_help().split())
    assert "comma-separated base algorithms (default: MEMIT,EMMET,AlphaEdit)" in text
    assert "every one with a bundled" not in text
    assert f"mom2_update_weight values (default {tune.lambdas};" in text and tune.lambdas == "1000,5000,15000,30000"
    assert parser.parse_args(["compare"]).algs is None
    compare = " ".join(sub.choices["compare"].format_help().split())
    assert "(default: every one with a bundled YAML for --model, hparams/<ALG>_REPLAY/<model>.yaml; SmolLM2's without --model)" in compare
    # --point and --lambda: offered by compare, not by tune (whose grid axes replace them; still
    # parsed, so that tune refuses them naming --points and --lambdas); tune has no --n
    assert "--point {bundled,paper,host-fe} operating point" in compare and "--lambda LAMBDA override" in compare
    assert "--records RECORDS use this slice of --data before --n, START:END" in compare
    assert "--point" not in text.replace("--points", "") and "--lambda " not in text and "LAMBDA " not in text
    assert not re.search(r"--n\b", text)
    assert "--records RECORDS the tuning split: this slice of --data, START:END" in text
    assert parser.parse_args(["tune", "--point", "paper", "--lambda", "3", "--out", "x"]).point == "paper"
    assert parser.parse_args(["tune", "--lambda", "3", "--out", "x"]).lambda_ == 3.0


def test_tune_refuses_hparams_with_named_points_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """``tune --hparams`` with the default ``--points`` (or any point but bundled) is refused
    naming --points and the fix, before any model loads; with ``--points bundled`` it goes on
    to load the model."""
    import easyedit_replay.models as models

    class Loaded(Exception):
        pass

    def load_model(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(models, "load_model", load_model)
    yaml, out = str(ROOT / "hparams" / "MEMIT_REPLAY" / "smollm2-135m.yaml"), tmp_path / "grid"
    assert main(["tune", "--hparams", yaml, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "error: --points bundled,paper,host-fe (the default) includes paper and host-fe, operating points of the "
        "bundled YAMLs; with --hparams the YAML sets the anchor settings: pass --points bundled\n")
    assert main(["tune", "--hparams", yaml, "--points", "paper", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --points paper includes paper, operating points")
    assert not out.exists()
    with pytest.raises(Loaded):
        main(["tune", "--hparams", yaml, "--points", "bundled", "--out", str(out)])


# ----------------------------------------------------------------------------- what a window sets


def test_window_sets_layers_and_keeps_the_loss_layer():
    """A window sets ``layers`` as a YAML with that window would: the anchors follow it
    (replay's at its first layer, spreading's at its last), ``v_loss_layer`` stays the
    model's last layer, and everything else is the YAML's."""
    for alg in GEMMA_ALGS:
        hp = load_hparams(default_hparams_path("gemma3-270m", f"{alg}_REPLAY"))
        moved = window_hparams(hp, (4, 5, 6, 7))
        assert moved.layers == [4, 5, 6, 7] and moved.v_loss_layer == hp.v_loss_layer == 17
        assert get_construction("replay").anchor_layers(moved.layers) == [4]
        assert get_construction("spread").anchor_layers(moved.layers) == [7]
        assert {k: v for k, v in moved.to_dict().items() if k != "layers"} == {
            k: v for k, v in hp.to_dict().items() if k != "layers"}
    alpha = load_hparams(default_hparams_path("gemma3-270m", "AlphaEdit_REPLAY")).replace(P_loc="P.pt")
    assert window_hparams(alpha, (2, 3, 4, 5)).layers == [2, 3, 4, 5]  # its own window: P_loc fits
    with pytest.raises(ReplayError, match="P_loc: null"):
        window_hparams(alpha, (1, 2, 3, 4))


def test_anchor_sets_of_a_grid():
    """One anchor set per distinct anchor layer and point: a layer that is one window's
    spreading anchor and another's replay anchor (4 below) is one set."""
    assert anchor_layers(parse_windows("1-4,2-5,4-7")) == [1, 2, 4, 5, 7]
    assert anchor_layers(parse_windows("1-4,2-5,4-7"), ["spread"]) == [4, 5, 7]
    assert anchor_layers([(4, 5, 6, 7, 8)]) == [4, 8]  # the SmolLM2 grid without windows: 2 per point


def test_the_yaml_window_is_the_reference_and_must_be_in_the_grid():
    assert yaml_window(gemma_by_point(), parse_windows("1-4,2-5,4-7")) == (2, 3, 4, 5)
    with pytest.raises(ReplayError, match=r"--windows: the YAMLs' window \[2, 3, 4, 5\] .* add 2-5"):
        yaml_window(gemma_by_point(), parse_windows("1-4,4-7"))
    mixed = gemma_by_point(["bundled"])
    mixed["bundled"]["EMMET"] = mixed["bundled"]["EMMET"].replace(layers=[1, 2, 3, 4])
    with pytest.raises(ReplayError, match="windows differ"):
        yaml_window(mixed, parse_windows("1-4,2-5"))


# ----------------------------------------------------------------------------- the folder layout


def test_grid_dir():
    assert grid_dir("OUT", "bundled", 5000) == Path("OUT/bundled/lambda5000")
    assert grid_dir("OUT", "paper", 2500.5, (2, 3, 4, 5)) == Path("OUT/paper/w2-5/lambda2500.5")


def _fake_run_scale(calls):
    def run_scale(model, tok, records, hps, cfg, out_dir, stats_dir=None, meta=None, report=True):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "scale.json").write_text(json.dumps({"planned": [], "meta": meta}))  # as run_scale's plan
        calls.append((Path(out_dir), {a: hp.layers for a, hp in hps.items()},
                      {a: hp.v_loss_layer for a, hp in hps.items()},
                      {a: hp.mom2_update_weight for a, hp in hps.items()}, dict(meta)))
    return run_scale


@pytest.mark.parametrize("windows", [None, "1-4,2-5,4-7"])
def test_folder_layout_with_and_without_windows(tmp_path, monkeypatch, windows):
    """Without windows every (point, lambda) has ``OUT/<point>/lambda<L>`` and the YAML's
    window, its meta as before; with windows each has ``OUT/<point>/w<a>-<b>/lambda<L>``
    per window, the window's layers, the YAML's loss layer and the window in its meta."""
    import easyedit_replay.experiments.scale as scale

    calls = []
    monkeypatch.setattr(scale, "run_scale", _fake_run_scale(calls))
    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=18))
    by_point = gemma_by_point(["bundled", "paper"])
    ws = parse_windows(windows) if windows else None
    run_tuning(model, None, [], by_point, [1000, 5000], SimpleNamespace(), tmp_path, meta={"model": "gemma3-270m"},
               windows=ws)
    found = sorted(str(c[0].relative_to(tmp_path)) for c in calls)
    if windows is None:
        assert found == ["bundled/lambda1000", "bundled/lambda5000", "paper/lambda1000", "paper/lambda5000"]
        assert all(layers == [2, 3, 4, 5] for c in calls for layers in c[1].values())
        assert calls[0][4] == {"model": "gemma3-270m", "operating_point": "bundled", "mom2_update_weight": 1000.0}
    else:
        assert found == [f"{p}/w{w}/lambda{lam}" for p in ("bundled", "paper") for w in ("1-4", "2-5", "4-7")
                         for lam in (1000, 5000)]
        for out, layers, loss, lams, meta in calls:
            w = out.parent.name[1:]
            first, last = map(int, w.split("-"))
            assert all(v == list(range(first, last + 1)) for v in layers.values())
            assert set(loss.values()) == {17}
            assert set(lams.values()) == {float(out.name[len("lambda"):])}
            assert meta["window"] == w and meta["yaml_window"] == "2-5"
    # the other layout is refused in the same --out
    with pytest.raises(ReplayError, match="--out"):
        run_tuning(model, None, [], by_point, [1000], SimpleNamespace(), tmp_path,
                   windows=None if windows else parse_windows("2-5"))


def test_window_beyond_the_model_is_refused_before_any_cell(tmp_path, monkeypatch):
    import easyedit_replay.experiments.scale as scale

    calls = []
    monkeypatch.setattr(scale, "run_scale", _fake_run_scale(calls))
    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=18))
    with pytest.raises(ReplayError, match="--windows: the window 15-18"):
        run_tuning(model, None, [], gemma_by_point(["bundled"]), [5000], SimpleNamespace(), tmp_path,
                   windows=parse_windows("2-5,15-18"))
    assert calls == []


def test_report_only_refuses_an_out_without_a_grid(tmp_path, capsys):
    """``tune --report-only`` on a missing folder, a file, an empty folder or a ``scale``
    folder: an error naming --out and what it should hold, and no report written."""
    missing, empty, scale_out, a_file = tmp_path / "missing", tmp_path / "empty", tmp_path / "scale", tmp_path / "f"
    empty.mkdir()
    (scale_out / "cells").mkdir(parents=True)
    (scale_out / "scale.json").write_text(json.dumps({"planned": [], "meta": {"model": "smollm2-135m"}}))
    a_file.write_text("")
    contents = ("the grid folders that `tune --out OUT` writes: <point>/lambda<L>/ (<point>/w<first>-<last>/lambda<L>/ "
                "with --windows), each with its scale.json and cells/")
    for out, why in ((missing, "no such folder; give the folder of a tune grid, holding "),
                     (a_file, "not a folder; give the folder of a tune grid, holding "),
                     (empty, "no tune grid here; the folder should hold "),
                     (scale_out, "no tune grid here (it is a `scale --out` folder: `easyedit-replay scale "
                                 "--report-only --out` reports it); the folder should hold ")):
        assert main(["tune", "--report-only", "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"error: --out {out}: {why}{contents}\n"
    assert not missing.exists() and list(empty.iterdir()) == [] and not (scale_out / "report.md").exists()
    # a grid folder with its plan but no finished cell yet is a grid: its report has the title, no picks
    (empty / "bundled" / "lambda5000").mkdir(parents=True)
    (empty / "bundled" / "lambda5000" / "scale.json").write_text(json.dumps(
        {"planned": [], "meta": {"model": "smollm2-135m", "data": "d.json", "records": "0:4"}}))
    assert main(["tune", "--report-only", "--out", str(empty)]) == 0
    report = (empty / "report.md").read_text()
    assert report.startswith("# Operating-point grid: smollm2-135m, d.json records 0:4, one batch") and "## Picks" not in report


# ----------------------------------------------------------------------------- the rule on a synthetic grid


def _write_cell(out: Path, window: str, lam: int, alg: str, mode: str, eff: float, gen: float, dkl: float, n=4):
    """One finished one-batch cell, as ``scale`` writes it (the fields the grid reads)."""
    folder = out / "bundled" / f"w{window}" / f"lambda{lam}"
    path = folder / "cells" / "batch" / f"n{n:05d}" / f"{alg}__{mode}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    edit = {"efficacy_exact": eff, "generalization_exact": gen, "locality_dkl": dkl, "locality_top1": 0.9,
            "fluency": 4.0}
    summary = {k: [v, v, v] for k, v in edit.items()}
    path.write_text(json.dumps({"kind": "batch", "n": n, "alg": alg, "mode": mode, "operating_point": "bundled",
                                "run": {"summary": summary, "per_edit": [edit] * n, "analyses": []}}))
    meta = {"model": "gemma3-270m", "data": "synthetic", "records": "0:4", "operating_point": "bundled",
            "mom2_update_weight": float(lam), "window": window, "yaml_window": "2-5"}
    (folder / "scale.json").write_text(json.dumps({"planned": [], "meta": meta}))


def _synthetic_grid(out: Path, best_window_score: float):
    """Windows 1-4, 2-5 (provisional), 4-7 x lambda 1000, 5000 x three algorithms x two
    constructions. Spread at 2-5 scores 0.6 (lambda 5000, the reference DKL 0.10) and 0.62
    at lambda 1000 (DKL 0.09); 1-4 scores 0.9 with DKL 0.2 (not admissible); 4-7 scores
    ``best_window_score`` at lambda 1000 for MEMIT and EMMET, at 5000 for AlphaEdit."""
    for alg in GEMMA_ALGS:
        for mode, bonus in (("spread", 0.0), ("replay", 0.05)):  # replay: generalization + 0.05
            _write_cell(out, "2-5", 5000, alg, mode, 0.8, 0.4 + bonus, 0.10)
            _write_cell(out, "2-5", 1000, alg, mode, 0.84, 0.4 + bonus, 0.09)
            _write_cell(out, "1-4", 5000, alg, mode, 1.0, 0.8, 0.20)
            _write_cell(out, "1-4", 1000, alg, mode, 1.0, 0.8, 0.30)
            high, low = (5000, 1000) if alg == "AlphaEdit" else (1000, 5000)
            _write_cell(out, "4-7", high, alg, mode, 2 * best_window_score - 0.4, 0.4 + bonus, 0.05)
            _write_cell(out, "4-7", low, alg, mode, 0.5, 0.1, 0.05)


def test_window_rule_picks_the_best_admissible_spread_window(tmp_path):
    _synthetic_grid(tmp_path, best_window_score=0.7)
    rows = grid_rows(tmp_path)
    assert {r["window"] for r in rows} == {"1-4", "2-5", "4-7"} and len(rows) == 36
    chosen = pick(rows, "2-5")
    assert chosen["point"] == "bundled" and chosen["window"] == "4-7"
    assert chosen["window_scores"] == pytest.approx({"2-5": 0.62, "4-7": 0.7})  # 1-4: DKL above 2-5's
    assert chosen["lambda"] == {"MEMIT": 1000.0, "EMMET": 1000.0, "AlphaEdit": 5000.0}
    assert chosen["best"][("MEMIT", "replay")]["window"] == "4-7"
    report = write_tuning_report(tmp_path).read_text()
    assert WINDOW_RULE.rstrip() in report
    assert "- edit window: **4-7** (provisional 2-5; mean best admissible spread score per window at bundled: " \
           "2-5 0.620, 4-7 0.700)" in report
    assert "- default lambda per algorithm: MEMIT 1000, EMMET 1000, AlphaEdit 5000" in report
    assert "| point | window | lambda | alg | mode |" in report
    assert "| bundled | 1-4 | 1000 | MEMIT | spread | 1.000 | 0.800 | 0.900 | 0.300 |" in report  # the whole grid
    assert "bundled window 4-7 lambda 1000" in report
    assert [r["window"] for r in json.loads((tmp_path / "grid.json").read_text())][:6] == [
        "1-4", "1-4", "2-5", "2-5", "4-7", "4-7"]


def test_window_rule_ties_go_to_the_provisional_window(tmp_path):
    """4-7 within 0.005 of 2-5's best (0.62) is a tie: the provisional window wins, and at
    it the lambda of the best admissible spread cell (1000, 0.02 above lambda 5000)."""
    _synthetic_grid(tmp_path, best_window_score=0.624)
    rows = grid_rows(tmp_path)
    chosen = pick(rows, "2-5")
    assert chosen["window"] == "2-5"
    assert chosen["lambda"] == {"MEMIT": 1000.0, "EMMET": 1000.0, "AlphaEdit": 1000.0}
    assert "- edit window: **2-5**" in write_tuning_report(tmp_path).read_text()
    # a window tie without the provisional window goes to the smaller first layer
    assert pick([dict(r, window="5-8") if r["window"] == "2-5" and r["lambda"] != 5000 else r for r in rows],
                "2-5")["window"] == "4-7"
    # within a window, a lambda tie goes to the bundled lambda (5000), as in RULE
    tied = [dict(r, score=0.6) if r["window"] == "2-5" and r["lambda"] == 1000 else r
            for r in rows if r["window"] != "4-7"]
    assert pick(tied, "2-5")["lambda"] == {"MEMIT": 5000.0, "EMMET": 5000.0, "AlphaEdit": 5000.0}


def test_one_window_reads_as_a_grid_without_windows(tmp_path):
    """A grid of one window (``--windows 2-5``) is reported as one without the axis."""
    for alg in GEMMA_ALGS:
        for mode in ("spread", "replay"):
            _write_cell(tmp_path, "2-5", 5000, alg, mode, 0.8, 0.4, 0.10)
    report = write_tuning_report(tmp_path).read_text()
    assert report.startswith("# Operating-point grid: ") and WINDOW_RULE.splitlines()[0] not in report
    assert "| point | lambda | alg | mode |" in report and "edit window" not in report
    assert "- default lambda per algorithm: MEMIT 5000, EMMET 5000, AlphaEdit 5000" in report


# ----------------------------------------------------------------------------- the written-down Gemma grid


def test_readme_gemma_grid_is_on_the_tuning_split():
    """hparams/README.md's Gemma grid command: its records lie inside TUNING_SPLITS (so the
    disjointness test covers them), its windows parse and include the YAMLs' window, and
    its anchor cost is what the README says."""
    text = (ROOT / "hparams" / "README.md").read_text()
    section = text[text.index("## Gemma 3 270M"):]
    command = re.search(r"easyedit-replay tune --model gemma3-270m [^\n]*", section).group(0)
    start, end = map(int, re.search(r"--records (\d+):(\d+)", command).groups())
    lo, hi = TUNING_SPLITS["counterfact-val.json"]
    assert "--data counterfact-val.json" in command and lo <= start < end <= hi
    windows = parse_windows(re.search(r"--windows (\S+)", command).group(1))
    points = re.search(r"--points (\S+)", command).group(1).split(",")
    assert yaml_window(gemma_by_point(points), windows) == (2, 3, 4, 5)
    layers = anchor_layers(windows)
    assert f"{len(layers)} anchor sets" in section


# ----------------------------------------------------------------------------- no windows: unchanged


@pytest.mark.parametrize("grid", ["tune_cf", "tune_zsre"])
def test_report_without_windows_is_unchanged(tmp_path, monkeypatch, grid):
    """``tune --report-only`` on a committed SmolLM2 grid without windows (docs/results/
    tune_cf, and tune_zsre, the ZsRE check of the operating points) rewrites report.md
    and grid.json byte for byte."""
    committed = ROOT / "docs" / "results" / grid
    meta = json.loads((committed / "bundled" / "lambda5000" / "scale.json").read_text())["meta"]
    if not Path(meta["data"]).exists():
        pytest.skip(f"the grid's data file {meta['data']} is absent (its anchor norms need it)")
    monkeypatch.setenv("EASYEDIT_REPLAY_ANCHOR_CACHE", str(ROOT / "docs" / "results" / "anchors"))
    out = tmp_path / grid
    shutil.copytree(committed, out, ignore=shutil.ignore_patterns("*.lock"))
    write_tuning_report(out)
    for name in ("report.md", "grid.json"):
        assert (out / name).read_bytes() == (committed / name).read_bytes(), name


def test_report_notes_anchor_norms_it_cannot_find(tmp_path, monkeypatch, capsys):
    """Without the grid's data file, or without its anchors in the anchor store in use,
    ``tune --report-only`` keeps the "Anchor norms" section as a note (and prints it to
    stderr) naming why, the folder searched and how to point at the bank; the rest of the
    report is the committed one (the section used to be dropped silently)."""
    committed = ROOT / "docs" / "results" / "tune_cf"
    head, section = (committed / "report.md").read_text().split("\n## Anchor norms\n")
    assert "| point | anchor layer |" in section
    out = tmp_path / "tune_cf"
    shutil.copytree(committed, out, ignore=shutil.ignore_patterns("*.lock"))
    meta = json.loads((committed / "bundled" / "lambda5000" / "scale.json").read_text())["meta"]
    empty, missing = tmp_path / "anchors", tmp_path / "no-anchors"
    empty.mkdir()
    how = ("Anchors are looked for in $EASYEDIT_REPLAY_ANCHOR_CACHE (default: the cache root's anchors/), here {}; "
           "point EASYEDIT_REPLAY_ANCHOR_CACHE at the anchor bank the grid was made with (this repository's: "
           "docs/results/anchors) and rerun `easyedit-replay tune --report-only --out OUT`.")
    cases = [(missing, f"no anchor folder at {missing}")]
    if Path(meta["data"]).exists():
        cases.append((empty, f"{empty} holds no anchor of the grid's records at its points"))
    for store, why in cases:
        monkeypatch.setenv("EASYEDIT_REPLAY_ANCHOR_CACHE", str(store))
        note = f"Not reported: {why}. " + how.format(store)
        assert main(["tune", "--report-only", "--out", str(out)]) == 0
        assert (out / "report.md").read_text() == f"{head}\n## Anchor norms\n\n{note}\n"
        assert capsys.readouterr().err == f"note: anchor norms: {note}\n"
    # the data file absent (another machine): the bank alone cannot match the records
    monkeypatch.setenv("EASYEDIT_REPLAY_ANCHOR_CACHE", str(ROOT / "docs" / "results" / "anchors"))
    for plan in out.glob("*/lambda*/scale.json"):
        plan.write_text(plan.read_text().replace(meta["data"], str(tmp_path / "gone.json")))
    write_tuning_report(out)
    note = (f"Not reported: the grid's data file {tmp_path / 'gone.json'} is absent (the anchors are matched to its "
            "records). " + how.format(ROOT / "docs" / "results" / "anchors"))
    assert (out / "report.md").read_text().endswith(f"\n## Anchor norms\n\n{note}\n")


def test_anchor_norms_name_the_grid_window_layers(tmp_path, monkeypatch):
    """The anchor-norm section of a grid of one window names that window's ends as the
    anchor layers (Gemma's 2-5: layers 2 and 5), with window folders (``--windows 2-5``)
    and without (the layers the cells changed); it used to name SmolLM2's 4 and 8
    whatever the grid's window."""
    import easyedit_replay.tune as tune
    from easyedit_replay.data import demo_path

    store = tmp_path / "anchors"
    store.mkdir()
    monkeypatch.setenv("EASYEDIT_REPLAY_ANCHOR_CACHE", str(store))
    norms = [{"point": "bundled", "layer": 2, "n": 4, "ratio": 4.0, "delta": 18.5, "h": 4.6}]
    monkeypatch.setattr(tune, "anchor_norms", lambda *a, **k: norms)
    out = tmp_path / "grid"
    for mode in ("spread", "replay"):
        _write_cell(out, "2-5", 5000, "MEMIT", mode, 0.8, 0.4, 0.10)
    plan = out / "bundled" / "w2-5" / "lambda5000" / "scale.json"
    plan.write_text(plan.read_text().replace('"synthetic"', json.dumps(str(demo_path()))))
    gemma = "Layer 2 is replay's anchor (the first edit layer), layer 5 spreading's (the last)"
    report = write_tuning_report(out).read_text()
    assert gemma in report and "| bundled | 2 | 4 | 4.000 | 18.5 | 4.6 |" in report
    # the same cells without window folders: the span of the layers they changed
    flat = tmp_path / "flat"
    shutil.copytree(out / "bundled" / "w2-5", flat / "bundled")
    for path in (flat / "bundled" / "lambda5000" / "cells").rglob("*.json"):
        cell = json.loads(path.read_text())
        cell["run"]["analyses"] = [{"update_norm": {f"model.layers.{l}.mlp.down_proj.weight": 1.0
                                                    for l in (2, 3, 4, 5)}}]
        path.write_text(json.dumps(cell))
    assert gemma in write_tuning_report(flat).read_text()
