"""``easyedit-replay scale`` on the real model (few edits, edit layers 7 and 8, 2 anchor steps, no fluency):
a stopped run resumes to the same cells, a one-batch cell equals ``compare`` on the same
records, and the sequential bookkeeping (edits evaluated, AlphaEdit's key cache)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from easyedit_replay.experiments import scale, tables
from easyedit_replay.algorithms import load_hparams
from easyedit_replay.cli import default_hparams_path
from easyedit_replay.experiments.scale import ScaleConfig, run_scale

from .conftest import ROOT, SHARED_DATA, load_script, requires_shared, results_section

pytestmark = pytest.mark.slow

N_BOOT = 200


LAYERS = [7, 8]


def _hparams(stats_dir, alg):
    return load_hparams(default_hparams_path(alg=f"{alg}_REPLAY"), stats_dir=stats_dir, v_num_grad_steps=2,
                        layers=LAYERS)


def _batch_cfg():
    return ScaleConfig(sizes=[1, 2], modes=("spread", "replay"), fluency=False, n_boot=N_BOOT, progress=False)


def _seq_cfg():
    return ScaleConfig(sizes=[4], modes=("spread",), sequential=True, batch_size=2, curve=True, fluency=False,
                       n_boot=N_BOOT, progress=False)


def _run_both(model, tok, records, stats_dir, out, report=False):
    run_scale(model, tok, records, {"MEMIT": _hparams(stats_dir, "MEMIT")}, _batch_cfg(), out, report=False)
    run_scale(model, tok, records, {"AlphaEdit": _hparams(stats_dir, "AlphaEdit")}, _seq_cfg(), out, report=report)


def _timeless(obj):
    """``obj`` without wall-clock fields (they differ between any two runs)."""
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items()
                if not (k.endswith("seconds") or k in ("finished", "timing"))}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def _cells(out):
    return {str(p.relative_to(out)): _timeless(json.loads(p.read_text())) for p in sorted(out.glob("cells/**/*.json"))}


@pytest.fixture(scope="module")
def reference(model_tok, stats_dir, demo_records, tmp_path_factory):
    """An uninterrupted run: one batch of 1 and of 2 (MEMIT, spread and replay) and 4
    AlphaEdit edits in 2 sequential batches of 2, evaluated after each."""
    from easyedit_replay.algorithms.alphaedit import reset_alphaedit_cache

    model, tok = model_tok
    reset_alphaedit_cache(model)
    out = tmp_path_factory.mktemp("scale_reference")
    _run_both(model, tok, demo_records[:4], stats_dir, out)
    return out


def test_stopped_run_resumes_to_the_same_cells(model_tok, stats_dir, demo_records, reference, tmp_path, monkeypatch):
    """Stop (KeyboardInterrupt) right after the first edited cell of each kind is written,
    rerun: finished cells are not recomputed, and every cell equals the uninterrupted run's."""
    model, tok = model_tok
    real_write = scale.write_cell
    written = []

    def stop_after_first_edited_cell(path, cell, settings):
        real_write(path, cell, settings)
        written.append(path)
        if cell["kind"] != "unedited" and sum(1 for p in written if "unedited" not in str(p)) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(scale, "write_cell", stop_after_first_edited_cell)
    records = demo_records[:4]
    with pytest.raises(KeyboardInterrupt):
        run_scale(model, tok, records, {"MEMIT": _hparams(stats_dir, "MEMIT")}, _batch_cfg(), tmp_path)
    first = [p for p in written if "unedited" not in str(p)]
    assert [p.name for p in first] == ["MEMIT__spread.json"] and "n00001" in str(first[0])
    written.clear()
    with pytest.raises(KeyboardInterrupt):
        run_scale(model, tok, records, {"AlphaEdit": _hparams(stats_dir, "AlphaEdit")}, _seq_cfg(), tmp_path)
    assert [p.name for p in written if "unedited" not in str(p)] == ["step001.json"]
    assert "report.md" not in {p.name for p in tmp_path.iterdir()}

    monkeypatch.setattr(scale, "write_cell", lambda *a: (written.append(a[0]), real_write(*a)))
    written.clear()
    _run_both(model, tok, records, stats_dir, tmp_path, report=True)
    resumed = sorted(str(p.relative_to(tmp_path)) for p in written if "unedited" not in str(p))
    assert resumed == ["cells/batch/n00001/MEMIT__replay.json", "cells/batch/n00002/MEMIT__replay.json",
                       "cells/batch/n00002/MEMIT__spread.json",
                       "cells/seq_b0002_n00004/AlphaEdit__spread/step002.json"]
    assert _cells(tmp_path) == _cells(reference)
    report = (tmp_path / "report.md").read_text()
    assert "Missing cells" not in report and "One batch of 2 edits" in report and "Sequential: 4 edits" in report
    assert "![scale](scale_metrics.png)" in report and (tmp_path / "n00002" / "results.json").exists()


@pytest.mark.parametrize("update_changed", [False, True], ids=["float-rounding", "update-changed"])
def test_series_resumed_on_another_machine_keys_anchors_under_the_recorded_fingerprint(
        model_tok, stats_dir, demo_records, reference, tmp_path, caplog, monkeypatch, update_changed):
    """A series whose first step was recorded on other bytes (its cell's fingerprint is
    another machine's). When the re-applied update matches the cell's norms
    (:func:`scale.redo_drift`), the next step's anchors are keyed under the recorded
    fingerprint (the anchor file's key names it); when the cell's norms say the update
    changed, a warning says so and the next step keys its anchors by its own weights.
    Either way the resumed run writes the uninterrupted run's cells."""
    import os
    import shutil

    from safetensors import safe_open

    model, tok = model_tok
    series = "cells/seq_b0002_n00004/AlphaEdit__spread"
    (tmp_path / series).mkdir(parents=True)
    step1 = json.loads((reference / series / "step001.json").read_text())
    other = "0" * len(step1["fingerprint"])
    step1["fingerprint"] = other
    if update_changed:
        norms = step1["analysis"]["update_norm"]
        step1["analysis"]["update_norm"] = {w: 1.01 * v for w, v in norms.items()}
    (tmp_path / series / "step001.json").write_text(json.dumps(step1))
    anchors = tmp_path / "anchors"
    shutil.copytree(os.environ["EASYEDIT_REPLAY_ANCHOR_CACHE"], anchors)  # the bank as the first machine left it
    monkeypatch.setenv("EASYEDIT_REPLAY_ANCHOR_CACHE", str(anchors))
    with caplog.at_level(logging.INFO):
        run_scale(model, tok, demo_records[:4], {"AlphaEdit": _hparams(stats_dir, "AlphaEdit")}, _seq_cfg(),
                  tmp_path, report=False)
    rounding = "step 1 re-applied to weights that differ from the recorded ones by float rounding"
    changed = "step 1 re-applied with an update that differs from the recorded one"
    assert (changed in caplog.text, rounding in caplog.text) == (update_changed, not update_changed)
    keyed = set()
    for path in anchors.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keyed.add(json.loads(f.metadata()["key"])["model"])
    assert (other in keyed) == (not update_changed)  # step 2's anchors, under the recorded fingerprint or not
    step2 = f"{series}/step002.json"
    assert _timeless(json.loads((tmp_path / step2).read_text())) == _timeless(
        json.loads((reference / step2).read_text()))
    assert scale.redo_drift({"w": 1.0}, {"w": 1.0 + 1e-7}) < scale.REDO_TOLERANCE < scale.redo_drift(
        {"w": 1.0}, {"w": 1.01})
    assert scale.redo_drift({"w": 1.0}, None) is None and scale.redo_drift({"w": 1.0}, {"v": 1.0}) is None

def test_nested_prefix_cell_equals_compare(model_tok, stats_dir, demo_records, reference):
    """The n = 2 cell of ``--n 1,2`` is ``compare --n 2``: the same per-edit numbers,
    summaries and analyses (anchors come from the disk cache the scale run filled)."""
    from easyedit_replay.experiments.runner import CompareConfig, run_comparison

    model, tok = model_tok
    cfg = CompareConfig(modes=("spread", "replay"), fluency=False, target_accuracy=False, n_boot=N_BOOT,
                        progress=False)
    results = run_comparison(model, tok, demo_records[:2], {"MEMIT": _hparams(stats_dir, "MEMIT")}, cfg)
    unedited = json.loads((reference / "cells/unedited/n00002.json").read_text())
    assert _timeless(json.loads(json.dumps(results["unedited"]))) == {k: unedited[k] for k in ("per_edit", "summary")}
    for mode in ("spread", "replay"):
        cell = json.loads((reference / f"cells/batch/n00002/MEMIT__{mode}.json").read_text())
        run = _timeless(json.loads(json.dumps(results["runs"][f"MEMIT/{mode}"], default=str)))
        assert run == _timeless(cell["run"])
        assert len(cell["run"]["per_edit"]) == 2 and cell["run"]["per_edit"][0]["efficacy_win"] is not None


def test_sequential_bookkeeping(model_tok, stats_dir, demo_records, reference):
    """After k batches of 2 the evaluation covers exactly the first 2k records, AlphaEdit's
    key cache has rank 2k in every edited weight, and the numbers after 2 batches equal
    editing the same two batches with ``apply_edit(sequential_edit=True)`` and evaluating."""
    from easyedit_replay.algorithms.alphaedit import alphaedit_cache, reset_alphaedit_cache
    from easyedit_replay.editor import apply_edit, resolve_templates, weight_transaction
    from easyedit_replay.evaluate import evaluate_records
    from easyedit_replay.tracing import resolve_parameter

    model, tok = model_tok
    records = demo_records[:4]
    steps = [json.loads((reference / f"cells/seq_b0002_n00004/AlphaEdit__spread/step00{k}.json").read_text())
             for k in (1, 2)]
    for k, cell in enumerate(steps, start=1):
        assert cell["evaluated"] and cell["edits"] == 2 * k and cell["requests"] == [2 * k - 2, 2 * k - 1]
        assert cell["evaluated_cases"] == [r["case_id"] for r in records[: 2 * k]]
        assert len(cell["per_edit"]) == 2 * k
        ranks = cell["alphaedit_cache_rank"]
        assert sorted(ranks) == [f"model.layers.{l}.mlp.down_proj.weight" for l in LAYERS]
        assert set(ranks.values()) == {2 * k}
    # the same two batches, edited and evaluated directly
    hp = _hparams(stats_dir, "AlphaEdit").replace(alg_name="AlphaEdit_SPREAD")
    templates = resolve_templates(model, tok, hp)
    names = [f"model.layers.{l}.mlp.down_proj.weight" for l in LAYERS]
    params = {name: resolve_parameter(model, name) for name in names}
    baseline = evaluate_records(model, tok, records, None)
    reset_alphaedit_cache(model)
    with weight_transaction(params, restore_always=True):
        for batch in (records[:2], records[2:]):
            apply_edit(model, tok, batch, hp, context_templates=templates, sequential_edit=True)
        cache = alphaedit_cache(model)
        direct = evaluate_records(model, tok, records, baseline).rows
    reset_alphaedit_cache(model)
    assert all(int(torch.linalg.matrix_rank(c.double(), rtol=1e-6)) == 4 for c in cache.values())
    for got, want in zip(steps[1]["per_edit"], direct):
        assert got["logp_new"] == pytest.approx(want["logp_new"], abs=1e-4)
        assert got["efficacy_win"] == want["efficacy_win"]
        assert got["locality_dkl"] == pytest.approx(want["locality_dkl"], abs=1e-4)


@requires_shared
def test_anchor_bank_lists_the_banked_zsre_anchors(capsys):
    """``easyedit-replay anchors info`` on the committed bank: the ZsRE 192 cells' anchors
    (replay at layer 4, spread at layer 8, MEMIT YAML, bundled point) are all there with
    their step counts, the paper point's are a group of their own (its anchors are other
    cache keys), and PMET's are not ZsRE's."""
    from easyedit_replay.cli import main

    assert main(["anchors", "info", str(ROOT / "docs" / "results" / "anchors"),
                 "--data", f"{SHARED_DATA / 'zsre' / 'zsre-1k.json'}:192"]) == 0
    out = capsys.readouterr().out
    # with the optimization steps the banked anchors took: on ZsRE the early stop
    # (loss < 0.05) rarely fires before the 25th step
    assert ("zsre-1k.json first 192: layer 4, 1 site(s), model 85845f37, clamp 4, v_lr 0.5, decay 0.001: 192 banked, "
            "0 missing; steps 24.7/25, 178 of 192 ran all") in out
    assert ("zsre-1k.json first 192: layer 8, 1 site(s), model 85845f37, clamp 4, v_lr 0.5, decay 0.001: 192 banked, "
            "0 missing; steps 24.8/25, 181 of 192 ran all") in out
    assert ("zsre-1k.json first 192: layer 4, 2 site(s), model 85845f37, clamp 4, v_lr 0.5, decay 0.001: 0 banked, "
            "192 missing") in out
    assert "zsre-1k.json first 192: layer 8, 1 site(s), model 85845f37, clamp 0.75, v_lr 0.1, decay 0.5: " in out


def test_anchors_commands_refuse_a_data_item_without_its_count(capsys):
    """``--data FILE`` without ``:N`` is an error naming the fix, before any file is read."""
    from easyedit_replay.cli import main

    for argv in (["anchors", "info", "--data", "counterfact-val.json"],
                 ["anchors", "bank", "--data", "counterfact-val.json", "--shard", "1/2"],
                 ["anchors", "bank", "--data", "counterfact-val.json:8", "--shard", "3/2"]):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("'counterfact-val.json': give FILE:N") == 2 and "--shard '3/2': give j/k" in err


def test_plan_only_lists_the_planned_cells_as_missing_without_a_model(tmp_path, capsys):
    """``scale --plan-only`` records the cells in scale.json and the report lists the
    unfinished ones; no model is loaded and no cell is made. A sequential plan adds its
    steps beside the one-batch cells."""
    from easyedit_replay.cli import main

    out = tmp_path / "scale"
    assert main(["scale", "--plan-only", "--n", "4,8", "--algs", "MEMIT", "--modes", "spread,replay",
                 "--out", str(out)]) == 0
    assert main(["scale", "--plan-only", "--n", "8", "--sequential", "--batch-size", "4", "--algs", "AlphaEdit",
                 "--modes", "replay", "--out", str(out)]) == 0
    assert "loading" not in capsys.readouterr().err
    assert not (out / "cells").exists() or not any((out / "cells").rglob("*.json"))
    planned = json.loads((out / "scale.json").read_text())["planned"]
    assert len(planned) == 2 * 2 + 2
    report = (out / "report.md").read_text()
    for line in ("- one batch, n = 4, MEMIT/spread", "- one batch, n = 8, MEMIT/replay"):
        assert line in report
    assert report.count("AlphaEdit/replay") >= 2  # both sequential steps


def test_an_out_folder_keeps_its_operating_point(tmp_path, capsys):
    """``scale --point P --out DIR`` (and ``--plan-only``) on a folder whose cells or plan
    are at another point is refused before any work, naming the point to use; scale.json
    and the report stay as they were. The committed folders accept their own point
    (``scale_cf``'s older cells lack ``operating_point``: its scale.json names bundled),
    and a new folder takes any. ``run_scale`` refuses it too, before anything is made."""
    import shutil

    from easyedit_replay.cli import main
    from easyedit_replay.errors import ReplayError

    results = ROOT / "docs" / "results"
    out = tmp_path / "paper"
    shutil.copytree(results / "scale_cf_paper", out)
    recorded = json.loads((out / "scale.json").read_text())  # plans of the demo edits (--data is checked too)
    recorded["meta"]["data"] = "demo"
    (out / "scale.json").write_text(json.dumps(recorded, indent=1))
    before = {name: (out / name).read_bytes() for name in ("scale.json", "report.md")}
    plan = ["scale", "--plan-only", "--n", "8", "--algs", "MEMIT", "--modes", "spread", "--out", str(out)]
    for argv in (plan + ["--point", "bundled"], plan):  # bundled: also the default
        assert main(argv) == 2
        assert capsys.readouterr().err == (f"error: --out {out} holds cells at paper (this run: bundled); use --point "
                                           f"paper or another --out\n")
        assert {name: (out / name).read_bytes() for name in before} == before
    with pytest.raises(ReplayError, match="holds cells at paper"):
        run_scale(None, None, [{}] * 8, {"MEMIT": _hparams(str(tmp_path / "stats"), "MEMIT")}, _batch_cfg(), out)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert main(plan + ["--point", "paper"]) == 0
    assert json.loads((out / "scale.json").read_text())["meta"]["operating_point"] == ["paper"]
    fresh = tmp_path / "fresh"
    assert main(["scale", "--plan-only", "--n", "8", "--algs", "MEMIT", "--point", "host-fe", "--out", str(fresh)]) == 0
    assert main(["scale", "--plan-only", "--n", "8", "--algs", "MEMIT", "--out", str(fresh)]) == 2
    assert "holds a plan (scale.json) at host-fe (this run: bundled); use --point host-fe" in capsys.readouterr().err
    from easyedit_replay.experiments.cells import check_out_point

    check_out_point(results / "scale_cf", ["bundled"])
    check_out_point(results / "scale_cf_paper", ["paper"])
    with pytest.raises(ReplayError, match=r"holds cells at bundled \(this run: paper\); use --point bundled"):
        check_out_point(results / "scale_cf", ["paper"])


def test_a_replan_keeps_the_recorded_spelling_of_its_data(tmp_path, monkeypatch):
    """scale.json's ``meta["data"]`` keeps the path it records when a later plan names
    the same file another way (absolute for relative, as ``$CF`` for
    ``../shared/data/...``); another file replaces it."""
    from easyedit_replay.experiments.cells import update_plan

    (tmp_path / "data").mkdir()
    for name in ("cf.json", "other.json"):
        (tmp_path / "data" / name).write_text("[]")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "scale"
    out.mkdir()
    update_plan(out, [], {"data": "data/cf.json", "model": "smollm2-135m"})
    update_plan(out, [], {"data": str(tmp_path / "data" / "cf.json"), "model": "smollm2-135m"})
    assert json.loads((out / "scale.json").read_text())["meta"]["data"] == "data/cf.json"
    update_plan(out, [], {"data": "./data/../data/cf.json"})
    assert json.loads((out / "scale.json").read_text())["meta"]["data"] == "data/cf.json"
    update_plan(out, [], {"data": str(tmp_path / "data" / "other.json")})
    assert json.loads((out / "scale.json").read_text())["meta"]["data"] == str(tmp_path / "data" / "other.json")


def test_sequential_series_are_paired_against_spread_on_the_edits_made():
    """The paired difference ``mode - spread`` of a sequential series, on the committed
    CounterFact 8 x 96 cells: paired at each number of edits made that both modes have
    evaluated (MEMIT at 96 and 192, AlphaEdit at 96 only when its spread series has
    nothing more), on all edits made so far, and in the report's plain-words lines; the
    retention table (each batch's efficacy after every step) and the update norms."""
    series_dir = ROOT / "docs" / "results" / "scale_cf" / "cells" / "seq_b0096_n00768"
    series = {f"{alg}/{mode}": [json.loads((series_dir / f"{alg}__{mode}" / f"step{k:03d}.json").read_text())
                                for k in steps]
              for alg, mode, steps in (("MEMIT", "spread", (1, 2, 3)), ("MEMIT", "replay", (1, 2)),
                                       ("AlphaEdit", "spread", (1,)), ("AlphaEdit", "replay", (1,)))}
    by_made = tables.sequential_per_edit(series)
    assert {made: sorted(cells) for made, cells in by_made.items()} == {
        96: ["AlphaEdit/replay", "AlphaEdit/spread", "MEMIT/replay", "MEMIT/spread"],
        192: ["MEMIT/replay", "MEMIT/spread"], 288: ["MEMIT/spread"]}
    assert all(len(rows) == made for made, cells in by_made.items() for rows in cells.values())
    table = tables.sequential_paired_table(series, n_boot=1000, seed=0)
    assert [row[:3] for row in table[1:]] == [["MEMIT", "replay", "96"], ["MEMIT", "replay", "192"],
                                              ["AlphaEdit", "replay", "96"]]
    column = table[0].index("eff. Acc")
    # replay's efficacy lead over spread is clear after each of MEMIT's first two batches
    assert [row[column] for row in table[1:3]] == ["+0.08 [+0.03, +0.14]*", "+0.08 [+0.03, +0.13]*"]
    found = {"batch": {}, "sequential": {(96, 768): series}}
    lines = tables.clear_differences(found, n_boot=1000, seed=0)
    assert ("- sequential in batches of 96, 192 edits made, MEMIT: replay - spread, eff. Acc +0.078 "
            "[+0.026, +0.130] (better)") in lines
    assert ("- sequential in batches of 96, 96 edits made, AlphaEdit: replay - spread, gen. Acc -0.073 "
            "[-0.135, -0.010] (worse)") in lines
    # forgetting: each earlier batch's efficacy after every step, and each step's update norms
    retention = tables.retention_table(series)
    assert retention[0] == ["algorithm", "mode", "edits made", "batch 1", "batch 2", "batch 3"]
    assert retention[3] == ["MEMIT", "spread", "288", "0.86", "0.81", "0.94"]
    assert retention[5] == ["MEMIT", "replay", "192", "0.95", "0.95", ""]
    # the same, paired against spread on each batch's edits
    kept = tables.retention_paired_table(series, n_boot=1000, seed=0)
    assert kept[0] == ["algorithm", "mode - spread", "edits made", "batch 1", "batch 2", "batch 3"]
    assert kept[1:] == [["MEMIT", "replay", "96", "+0.08 [+0.03, +0.14]*", "", ""],
                        ["MEMIT", "replay", "192", "+0.07 [+0.00, +0.16]", "+0.08 [+0.01, +0.16]*", ""],
                        ["AlphaEdit", "replay", "96", "-0.01 [-0.03, +0.00]", "", ""]]
    norms = tables.update_norm_table(series)
    assert norms[0] == ["algorithm", "mode", "step"] + [f"|dW| layer {l}" for l in range(4, 9)]
    assert norms[4] == ["MEMIT", "replay", "1", "75.5", "59.6", "37.4", "21.1", "13.0"]


def test_results_scale_tables_are_the_tool_output_of_the_committed_cells():
    """Every row of docs/results.md "Results at scale" (one batch at each n, and the
    sequential series) is a row that ``easyedit-replay report DIR --markdown`` prints from the
    committed cells of ``docs/results/scale_cf`` or ``scale_zsre``: a number that no cell
    backs, or a cell rerun without docs/results.md updated, fails here."""
    import re
    import subprocess
    import sys

    section = results_section("## Results at scale")
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \| [A-Za-z]+ \| [a-z_]+ \|", line)]
    assert len(rows) >= 40, "the scale tables of docs/results.md were not found"
    printed = set()
    for out in ("scale_cf", "scale_zsre"):
        text = subprocess.run([sys.executable, "-m", "easyedit_replay.cli", "report",
                               str(ROOT / "docs" / "results" / out), "--markdown"], capture_output=True, text=True,
                              check=True).stdout
        printed |= set(text.splitlines())
    assert [row for row in rows if row not in printed] == []



def _markdown_table(text, title):
    """``(header, rows)`` of the first markdown table at or after ``title`` in ``text``
    (``title`` may be the table's own header line): each row its cells, stripped, the
    separator line left out."""
    lines = text[text.index(title):].splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("|")):]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in lines[:next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]]
    return rows[0], rows[2:]


@pytest.mark.parametrize("alg", ["MEMIT", "AlphaEdit"])
def test_results_paper_point_tables_are_the_tool_output_of_the_committed_cells(alg):
    """The two tables of docs/results.md "Sequential 8 x 96 at the paper's point (ALG)" are what
    ``report --points docs/results/scale_cf docs/results/scale_cf_paper`` gives from the
    committed cells (the first batch's efficacy Acc from each folder's committed report.md):
    each point's efficacy Acc / DKL / first batch's efficacy Acc, and the
    paired ``replay@paper - spread@bundled`` rows with the first batch's retention pair. A
    number no cell backs, or a cell added without the docs updated, fails here."""
    from easyedit_replay.experiments.points import points_markdown

    section = results_section(f"### Sequential 8 x 96 at the paper's point ({alg})", ("\n## ", "\n### "))
    printed = points_markdown([ROOT / "docs" / "results" / "scale_cf", ROOT / "docs" / "results" / "scale_cf_paper"],
                              modes=["spread", "replay"])

    first = lambda v: v.split(" [")[0]  # noqa: E731
    printed = printed[printed.index("## Sequential"):]  # the one-batch kinds come first
    cells = {(r[1], r[2], r[3]): r for r in _markdown_table(printed, "## Sequential")[1] if r[0] == alg}
    retention = {(r[1], r[2]): r[3] for r in _markdown_table(printed, "Retention, paired")[1] if r[0] == alg}
    paired = {r[2]: r for r in _markdown_table(printed, "Paired differences on the same edits")[1]
              if r[0] == alg and r[1] == "replay@paper - spread@bundled"}
    reports = {point: (ROOT / "docs" / "results" / folder / "report.md").read_text()
               for point, folder in (("bundled", "scale_cf"), ("paper", "scale_cf_paper"))}
    kept = {point: {(r[1], r[2]): r[3] for r in _markdown_table(text, "Retention: efficacy Acc of each batch")[1]
                    if r[0] == alg}
            for point, text in reports.items()}
    docs_cells = _markdown_table(section, "Each point's cells")[1]
    docs_paired = _markdown_table(section, "Replay at the paper's point minus spreading")[1]
    assert len(docs_cells) == 8 and docs_paired
    for row in docs_cells:
        for (mode, point), value in zip([("spread", "bundled"), ("replay", "bundled"), ("spread", "paper"),
                                         ("replay", "paper")], row[1:]):
            cell = cells.get((mode, point, row[0]))
            if cell is None:
                assert value == "not run", (row[0], mode, point)
                continue
            eff, dkl, batch1 = value.split(" / ")
            assert (eff, dkl, batch1) == (first(cell[4]), first(cell[6]), kept[point][(mode, row[0])]), \
                (row[0], mode, point)
    for row in docs_paired:
        assert row[1:6] == paired[row[0]][3:8], row[0]
        assert row[6] == retention[("replay@paper - spread@bundled", row[0])], row[0]
    assert [r[0] for r in docs_paired] == sorted(paired, key=int)


def test_results_refresh_tables_are_the_committed_scale_cf_report():
    """The tables of docs/results.md "Sequential: `+refresh` on the reported 8 x 96" are
    copied from the committed ``docs/results/scale_cf/report.md``: the series table (efficacy
    Acc, generalization Acc, DKL and fluency of all edits made, their paired ``- spread``, and
    the first batch's efficacy Acc) from its "Sequential", "Paired differences, sequential"
    and "Retention" tables, and the retention / fluency table (the first batch's efficacy Acc
    of ``replay+refresh`` and spreading, their paired difference, and the paired fluency) from
    its "Retention", "Retention, paired" and "Paired differences, sequential" tables; and the
    ``+refresh=4`` table (one row per step its cells have: efficacy Acc, DKL and the first
    batch's efficacy Acc, each with its pair against spreading, beside ``+refresh``'s), and the
    ``spread+refresh`` control's table (the same, with fluency, beside ``replay+refresh``'s). A
    number copied wrong, or a cell rerun without docs/results.md updated, fails here
    (``scale --out docs/results/scale_cf --report-only`` rewrites the report from the cells)."""
    section = results_section("### Sequential: `+refresh` on the reported 8 x 96", ("\n#",))
    report = (ROOT / "docs" / "results" / "scale_cf" / "report.md").read_text()
    report = report[report.index("\n## Sequential: 768 edits in batches of 96"):]

    def memit(title, text=report):
        """``{(mode, edits made): {column: value}}`` of the MEMIT rows of a report table."""
        header, rows = _markdown_table(text, title)
        return {(row[1], row[2]): dict(zip(header, row)) for row in rows if row[0] == "MEMIT"}

    first = lambda v: v.split(" [")[0]  # noqa: E731
    cells = memit("| algorithm | mode | edits made | eff. Success")
    paired = memit("Paired differences, sequential in batches of 96")
    kept = memit("Retention: efficacy Acc of each batch")
    kept_paired = memit("Retention, paired")

    header, series = _markdown_table(section, "| edits made | mode | eff. Acc | - spread | gen. Acc |")
    assert header == ["edits made", "mode", "eff. Acc", "- spread", "gen. Acc", "- spread", "DKL", "- spread",
                      "fluency", "batch 1 eff. Acc"]
    assert len(series) == 24
    for n, mode, eff, d_eff, gen, d_gen, dkl, d_dkl, fluency, batch1 in series:
        cell = cells[(mode, n)]
        assert [eff, gen, dkl, fluency] == [first(cell[c]) for c in ("eff. Acc", "gen. Acc", "DKL", "fluency")], \
            (n, mode)
        assert batch1 == kept[(mode, n)]["batch 1"], (n, mode)
        expected = ([""] * 3 if mode == "spread"
                    else [paired[(mode, n)][c] for c in ("eff. Acc", "gen. Acc", "DKL")])
        assert [d_eff, d_gen, d_dkl] == expected, (n, mode)

    header, retained = _markdown_table(section, "| edits made | batch 1: refresh / spread |")
    assert header == ["edits made", "batch 1: refresh / spread", "batch 1: - spread", "fluency: - spread"]
    assert [row[0] for row in retained] == [str(96 * k) for k in range(1, 9)]
    for n, both, d_batch1, d_fluency in retained:
        assert both == f"{kept[('replay+refresh', n)]['batch 1']} / {kept[('spread', n)]['batch 1']}", n
        assert d_batch1 == kept_paired[("replay+refresh", n)]["batch 1"], n
        assert d_fluency == paired[("replay+refresh", n)]["fluency"], n

    def with_pair(mode, n, column):
        """``value (pair)``: a cell's value and its paired ``- spread``, as the tables print them."""
        if column == "batch 1":
            return f"{kept[(mode, n)]['batch 1']} ({kept_paired[(mode, n)]['batch 1']})"
        return f"{first(cells[(mode, n)][column])} ({paired[(mode, n)][column]})"

    def refresh_cell(n):
        """``replay+refresh``'s ``eff. Acc / DKL / batch 1`` at ``n`` edits made, as the tables print it."""
        cell = cells[("replay+refresh", n)]
        return f"{first(cell['eff. Acc'])} / {first(cell['DKL'])} / {kept[('replay+refresh', n)]['batch 1']}"
    # the `+refresh=4` confirmation and the `spread+refresh` control: one row per step their committed cells
    # have, each value with its pair, beside `replay+refresh`'s
    for mode, title, header_expected, columns in (
            ("replay+refresh=4", "| edits made | eff. Acc (- spread) | DKL (- spread) |",
             ["edits made", "eff. Acc (- spread)", "DKL (- spread)", "batch 1 (- spread)",
              "`+refresh` (`w` 1): eff. Acc / DKL / batch 1"], ("eff. Acc", "DKL", "batch 1")),
            ("spread+refresh", "| edits made | spread+refresh: eff. Acc (- spread) |",
             ["edits made", "spread+refresh: eff. Acc (- spread)", "DKL (- spread)", "batch 1 (- spread)",
              "fluency (- spread)", "`replay+refresh`: eff. Acc / DKL / batch 1"],
             ("eff. Acc", "DKL", "batch 1", "fluency"))):
        header, rows = _markdown_table(section, title)
        assert header == header_expected, mode
        assert [row[0] for row in rows] == sorted((n for m, n in cells if m == mode), key=int), mode
        for n, *values, beside in rows:
            assert values == [with_pair(mode, n, c) for c in columns], (mode, n)
            assert beside == refresh_cell(n), (mode, n)


@pytest.mark.parametrize("heading, end, folders, n", [
    ("### One batch of 192 at the paper's point", "\n`report --points` sets the cells", ("scale_cf", "scale_cf_paper"),
     192),
    ("### One batch of 768 at the paper's point", "\n### ", ("scale_cf", "scale_cf_paper"), 768),
    ("### ZsRE: one batch of 192 at the paper's point", "\n## ", ("scale_zsre", "scale_zsre_paper"), 192),
], ids=["counterfact-192", "counterfact-768", "zsre-192"])
def test_results_paper_point_one_batch_table_is_the_tool_output_of_the_committed_cells(heading, end, folders, n):
    """The tables of docs/results.md "One batch of 192 at the paper's point" and "One batch
    of 768 at the paper's point" (CounterFact), and "ZsRE: one batch of 192 at the paper's
    point", are what ``report --points
    docs/results/<bundled folder> docs/results/<paper folder> --modes spread,replay,blue``
    gives for one batch of ``n``: each point's efficacy Acc / generalization Acc / DKL,
    ``mode - spread`` within each point, and ``mode@paper - spread@bundled``; a number no
    cell backs fails here."""
    from easyedit_replay.experiments.points import points_markdown

    section = results_section(heading, (end,))
    printed = points_markdown([ROOT / "docs" / "results" / folder for folder in folders],
                              modes=["spread", "replay", "blue"])
    begin = printed.index(f"## One batch of {n} edits")
    after = printed.find("\n## ", begin)  # the next kind of cell, if the report has one
    printed = printed[begin:after if after >= 0 else None]

    first = lambda v: v.split(" [")[0]  # noqa: E731
    cells = {(r[0], r[1], r[2]): r for r in _markdown_table(printed, "| algorithm | mode | point |")[1]}
    pairs = {(r[0], r[1]): r[2:5] for r in _markdown_table(printed, "| algorithm | difference |")[1]}
    docs = _markdown_table(section, "| algorithm | mode | at bundled")[1]
    assert len(docs) == 9
    for alg, mode, bundled, paper, within_b, within_p, eff, gen, dkl in docs:
        for point, value in (("bundled", bundled), ("paper", paper)):
            cell = cells[(alg, mode, point)]
            assert value == " / ".join(first(v) for v in cell[3:6]), (alg, mode, point)
        if mode != "spread":
            assert within_b == pairs[(alg, f"{mode}@bundled - spread@bundled")][0], (alg, mode)
            assert within_p == pairs[(alg, f"{mode}@paper - spread@paper")][0], (alg, mode)
        assert [eff, gen, dkl] == pairs[(alg, f"{mode}@paper - spread@bundled")], (alg, mode)

# ----------------------------------------------------------------------------- provenance of a cell


def _no_model_runner(monkeypatch, calls):
    """``run_scale`` without a model: templates, the unedited evaluation and each edit
    are stand-ins returning fixed rows (``calls`` counts the edits); the cell bookkeeping,
    summaries and writing are the real ones."""
    import contextlib

    import easyedit_replay.editor as editor

    row = {"efficacy_exact": 1.0, "generalization_exact": 0.5, "locality_dkl": 0.1, "locality_top1": 0.9,
           "fluency": 4.0}

    def run_mode(model, tok, records, hp, construction, cfg, baseline, templates, bar):
        calls.append(hp.alg_name)
        return {"per_edit": [dict(row) for _ in records], "analyses": []}

    monkeypatch.setattr(editor, "resolve_templates", lambda model, tok, hp: [["{}"]])
    monkeypatch.setattr(scale, "shared_anchors", lambda model, cfg: contextlib.nullcontext())
    monkeypatch.setattr(scale, "unedited_block", lambda model, tok, records, cfg: (
        None, {"per_edit": [dict(row) for _ in records], "summary": {}}))
    monkeypatch.setattr(scale, "run_mode", run_mode)


def _git_commit_of(root):
    """The checkout's short HEAD (+dirty for uncommitted changes to tracked files of its
    easyedit_replay/), or None when ``root`` is not the top of a git checkout."""
    import subprocess
    from pathlib import Path

    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)  # noqa: E731
    top = git("rev-parse", "--show-toplevel")
    if top.returncode or Path(top.stdout.strip()).resolve() != Path(root).resolve():
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "easyedit_replay").stdout.strip()
    return git("rev-parse", "--short", "HEAD").stdout.strip() + ("+dirty" if dirty else "")


def test_tune_and_scale_cells_record_their_provenance(tmp_path, monkeypatch):
    """Every cell ``tune`` makes (through ``run_scale``: the unedited cell and each batch
    cell) records the package version and the checkout's commit; a cell without the field
    (written before it existed) is read back as finished, and the report is the same."""
    from pathlib import Path

    import easyedit_replay
    from easyedit_replay.tune import run_tuning

    calls = []
    _no_model_runner(monkeypatch, calls)
    records = [{"case_id": i, "prompt": f"p{i}", "target_new": "t"} for i in range(2)]
    hp = load_hparams(default_hparams_path(alg="MEMIT_REPLAY"))
    cfg = ScaleConfig(sizes=[2], modes=("spread", "replay"), fluency=False, n_boot=20, progress=False)
    meta = {"model": "smollm2-135m", "data": "synthetic", "records": "0:2"}
    report = run_tuning(None, None, records, {"bundled": {"MEMIT": hp}}, [5000], cfg, tmp_path, meta=meta)
    cells = sorted(tmp_path.glob("bundled/lambda5000/cells/**/*.json"))
    assert [str(p.relative_to(tmp_path / "bundled" / "lambda5000" / "cells")) for p in cells] == [
        "batch/n00002/MEMIT__replay.json", "batch/n00002/MEMIT__spread.json", "unedited/n00002.json"]
    expected = {"version": easyedit_replay.__version__,
                "commit": _git_commit_of(Path(easyedit_replay.__file__).resolve().parents[1])}
    for path in cells:
        assert json.loads(path.read_text())["provenance"] == expected, path
    assert len(calls) == 2 and "| bundled | 5000 | MEMIT | spread | 1.000 | 0.500 | 0.750 | 0.100 |" in report.read_text()
    # the cells as written before the field existed: finished (not recomputed), the same report
    before = report.read_text()
    for path in cells:
        cell = json.loads(path.read_text())
        del cell["provenance"]
        path.write_text(json.dumps(cell, indent=1))
    run_tuning(None, None, records, {"bundled": {"MEMIT": hp}}, [5000], cfg, tmp_path, meta=meta)
    assert len(calls) == 2 and report.read_text() == before
    assert all("provenance" not in json.loads(p.read_text()) for p in cells)


def test_source_commit_in_and_out_of_a_checkout(tmp_path, monkeypatch):
    """The commit is the short HEAD of the checkout the package sits at the top of, with
    +dirty for a change to a tracked file of the package (staged or not), not for an
    untracked file; None outside git and for a package inside another repository's tree."""
    import subprocess

    from easyedit_replay import provenance

    def git(repo, *args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    def commit_of(package_dir):
        monkeypatch.setattr(provenance, "PACKAGE_DIR", package_dir)
        provenance.source_commit.cache_clear()
        try:
            return provenance.source_commit()
        finally:
            provenance.source_commit.cache_clear()

    repo = tmp_path / "checkout"
    package = repo / "easyedit_replay"
    package.mkdir(parents=True)
    (package / "core.py").write_text("x = 1\n")
    (repo / "README.md").write_text("r\n")
    assert commit_of(package) is None  # not in git yet
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "c")
    head = git(repo, "rev-parse", "--short", "HEAD")
    assert commit_of(package) == head and len(head) >= 7
    (package / "new.py").write_text("y = 2\n")  # untracked: not dirty
    (repo / "README.md").write_text("changed outside the package\n")  # not the package: not dirty
    assert commit_of(package) == head
    (package / "core.py").write_text("x = 2\n")
    assert commit_of(package) == head + "+dirty"
    git(repo, "add", "easyedit_replay/core.py")  # staged, not committed: still dirty
    assert commit_of(package) == head + "+dirty"
    # a checkout owned by another user: git refuses it ("dubious ownership") unless it is marked
    # safe, which source_commit does for the checkout it reads (git's own test switch fakes the owner)
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    assert subprocess.run(["git", "-C", str(repo), "status"], capture_output=True, text=True).returncode != 0
    assert commit_of(package) == head + "+dirty"
    monkeypatch.delenv("GIT_TEST_ASSUME_DIFFERENT_OWNER")
    nested = repo / "site" / "easyedit_replay"  # an installed copy inside another repository's tree
    nested.mkdir(parents=True)
    assert commit_of(nested) is None
    assert provenance.provenance()["version"] == provenance.__version__


# ----------------------------------------------------------------------------- scripts/recompute_summaries.py


def test_recompute_summaries_replaces_only_the_non_finite_entries(tmp_path, capsys):
    """A summary stored with inf (the residual ratio of an edit with a zero gap, before
    non-finite values were dropped) is recomputed from the cell's per-edit rows with its
    n_boot and seed: the inf entry becomes the mean over the finite rows, every other
    entry and the rows stay as stored; a second run changes nothing; a cell whose finite
    entries do not recompute to the stored values is refused and left as it is."""
    from easyedit_replay.experiments.cells import write_cell
    from easyedit_replay.experiments.statistics import bootstrap, summarize_ci

    script = load_script("recompute_summaries")
    rows = [{"efficacy_exact": float(i % 2), "final_ratio": 0.1 * (i + 1)} for i in range(5)]
    rows.append({"efficacy_exact": 1.0, "final_ratio": float("inf")})
    settings = {"metrics": {"n_boot": 50, "seed": 3}}
    good = {k: list(v) for k, v in summarize_ci(rows, 50, 3).items()}
    old = dict(good, final_ratio=[float("inf"), 0.2, float("inf")])  # as written before the fix
    out = tmp_path / "scale"
    step = out / "cells" / "seq_b0002_n00006" / "MEMIT__replay" / "step003.json"
    batch = out / "cells" / "batch" / "n00006" / "MEMIT__spread.json"
    clean = out / "cells" / "batch" / "n00006" / "MEMIT__replay.json"
    wrong = out / "cells" / "batch" / "n00006" / "EMMET__spread.json"
    write_cell(step, {"kind": "sequential", "per_edit": rows, "summary": old}, settings)
    write_cell(batch, {"kind": "batch", "run": {"per_edit": rows, "summary": old}}, settings)
    write_cell(clean, {"kind": "batch", "run": {"per_edit": rows, "summary": good}}, settings)
    write_cell(wrong, {"kind": "batch", "run": {"per_edit": rows, "summary": dict(old, efficacy_exact=[0.5] * 3)}},
               settings)
    (out / "scale.json").write_text("{}")
    before = {p: p.read_bytes() for p in (step, batch, clean, wrong)}

    assert script.main(["--dry-run", str(out)]) == 1  # the wrong cell is refused
    assert {p: p.read_bytes() for p in before} == before
    capsys.readouterr()
    assert script.main([str(out)]) == 1
    printed = capsys.readouterr()
    mean, lo, hi = bootstrap([r["final_ratio"] for r in rows[:5]], 50, 3)
    assert mean == pytest.approx(0.3)
    for path, where in ((step, "summary"), (batch, "run.summary")):
        cell = json.loads(path.read_text())
        block = cell if where == "summary" else cell["run"]
        assert block["summary"] == dict(good, final_ratio=[mean, lo, hi])
        assert block["per_edit"][-1]["final_ratio"] == float("inf") and cell["settings"] == settings
        assert f"{path}: {where}.final_ratio [inf, 0.2, inf] -> [{mean}, {lo}, {hi}]" in printed.out
    assert clean.read_bytes() == before[clean] and wrong.read_bytes() == before[wrong]
    assert (f"{wrong}: left as it is: run.summary.efficacy_exact recomputes to {good['efficacy_exact']}, not the "
            "stored [0.5, 0.5, 0.5]") in printed.err
    assert "2 cell(s) rewritten" in printed.out and f"easyedit-replay scale --report-only --out {out}" in printed.out
    assert script.main([str(out)]) == 1 and "0 cell(s) rewritten" in capsys.readouterr().out
    assert script.main([str(tmp_path / "missing")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_recompute_summaries_finds_the_cells_and_the_report_of_any_folder_given(tmp_path, capsys):
    """The folder given may hold several scale folders (each gets its own scale report
    command), be a tune grid's scale folder (windowed or not: the command is the grid's
    tune report), or be a cells/ folder; a folder given twice is read once; a folder
    without cells and a cell that is no JSON object are named (exit status 1), the other
    cells still done."""
    from easyedit_replay.experiments.cells import write_cell
    from easyedit_replay.experiments.statistics import summarize_ci

    script = load_script("recompute_summaries")
    rows = [{"efficacy_exact": float(i % 2), "final_ratio": 0.1 * (i + 1)} for i in range(4)]
    old = dict({k: list(v) for k, v in summarize_ci(rows, 20, 0).items()}, final_ratio=[float("inf")] * 3)

    def inf_cell(folder):
        path = folder / "cells" / "batch" / "n00004" / "MEMIT__replay.json"
        write_cell(path, {"kind": "batch", "run": {"per_edit": rows, "summary": old}},
                   {"metrics": {"n_boot": 20, "seed": 0}})
        (folder / "scale.json").write_text("{}")
        return path

    runs, grid, windowed = tmp_path / "runs", tmp_path / "grid", tmp_path / "wgrid"
    cells = [inf_cell(runs / "a"), inf_cell(runs / "b"), inf_cell(grid / "bundled" / "lambda5000"),
             inf_cell(windowed / "paper" / "w2-5" / "lambda1000")]
    before = {p: p.read_bytes() for p in cells}

    def run(*dirs):
        status = script.main(["--dry-run", *map(str, dirs)])
        printed = capsys.readouterr()
        return status, printed.out.splitlines(), printed.err

    scale_a, scale_b = (f"  easyedit-replay scale --report-only --out {runs / x}" for x in "ab")
    tune_grid, tune_windowed = (f"  easyedit-replay tune --report-only --out {g}" for g in (grid, windowed))
    status, out, err = run(runs)
    assert status == 0 and err == ""
    assert out[-4:] == ["2 cell(s) would be rewritten", "regenerate the reports:", scale_a, scale_b]
    status, out, _ = run(grid / "bundled" / "lambda5000", windowed / "paper")
    assert status == 0 and out[-4:] == ["2 cell(s) would be rewritten", "regenerate the reports:", tune_grid,
                                        tune_windowed]
    status, out, _ = run(runs / "a" / "cells", runs / "a", runs / "a" / "cells" / "batch")  # one cell, read once
    assert status == 0 and out[-3:] == ["1 cell(s) would be rewritten", "regenerate the reports:", scale_a]
    assert len([line for line in out if line.startswith(str(cells[0]))]) == 1
    # no cells below a folder; a cell that is no JSON object
    (tmp_path / "empty").mkdir()
    broken, listed = runs / "b" / "cells" / "batch" / "n00004" / "EMMET__replay.json", runs / "b" / "cells" / "x.json"
    broken.write_text('{"kind": "batch", ')
    listed.write_text("[]")
    status, out, err = run(tmp_path / "empty", runs / "b")
    assert status == 1 and out[-3:] == ["1 cell(s) would be rewritten", "regenerate the reports:", scale_b]
    assert err.splitlines() == [
        f"{tmp_path / 'empty'}: no cell files below it (*.json under a cells/ folder); give a scale --out folder, "
        "a tune --out grid or a cells/ folder",
        f"{broken}: left as it is: not a cell: unreadable JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 19 (char 18))",
        f"{listed}: left as it is: not a cell: a JSON list, not an object"]
    assert {p: p.read_bytes() for p in cells} == before


def test_results_gemma_table_is_the_tool_output_of_the_committed_cells():
    """The table of docs/results.md "A second model family: Gemma 3 270M" is what ``report
    --models docs/results/scale_cf docs/results/scale_cf_gemma3`` gives from the committed
    cells: per one-batch size both models have, algorithm and mode, each model's efficacy
    Acc / generalization Acc / DKL and its ``mode - spread`` pairs on the same edits. A
    number no cell backs, or a size both models have without its rows, fails here."""
    from easyedit_replay.experiments.points import models_markdown

    section = results_section("## A second model family: Gemma 3 270M", ())  # the page's last section
    printed = models_markdown([ROOT / "docs" / "results" / "scale_cf", ROOT / "docs" / "results" / "scale_cf_gemma3"],
                              modes=["spread", "replay", "blue"])
    first = lambda v: v.split(" [")[0]  # noqa: E731
    models = ("smollm2-135m", "gemma3-270m")
    expected = []
    for kind in printed.split("\n## One batch of ")[1:]:
        n = kind.split(" ", 1)[0]
        header, rows = _markdown_table(kind, "| algorithm | mode | model |")
        cells = {(r[0], r[1], r[2]): dict(zip(header, r)) for r in rows}
        header, rows = _markdown_table(kind, "Paired differences on the same edits")
        paired = {(r[0], r[1]): dict(zip(header, r)) for r in rows}
        for alg, mode in sorted({(a, m) for a, m, _ in cells}, key=lambda am: (am[0] != "MEMIT", 
                                                                               ("spread", "replay", "blue").index(am[1]))):
            row = [n, alg, mode] + [" / ".join(first(cells[(alg, mode, m)][k]) for k in ("eff. Acc", "gen. Acc", "DKL"))
                                    for m in models]
            for key in ("eff. Acc", "gen. Acc", "DKL"):
                row += ["" if mode == "spread" else paired[(alg, f"{mode}@{m} - spread@{m}")][key] for m in models]
            expected.append(row)
    header, documented = _markdown_table(section, "| n | algorithm | mode | SmolLM2:")
    assert len(header) == 11 and expected
    assert documented == expected
