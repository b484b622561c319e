"""The experiment layer without a model: the metric registry reproduces every table's
columns, a toy metric registered with one ``Metric`` line reaches every table of its
groups, run keys and their order, and the one ``mean [lo, hi]`` formatter."""

from __future__ import annotations

import pytest

import easyedit_replay.experiments.metrics as registry
from easyedit_replay.experiments.metrics import Metric, RunKey, metrics, mode_style, register_metric, run_order
from easyedit_replay.experiments.statistics import summarize_ci
from easyedit_replay.experiments.tables import batch_table, fmt, marked, paired_table, table_rows


def _keys(group):
    return [m.key for m in metrics(group)]


def test_groups_are_the_columns_the_reports_had():
    """The column lists that used to live in experiment.py, scale.py, tools/ and tune.py,
    in their order (the committed reports regenerate byte-identical from them)."""
    paper = ["efficacy_win", "efficacy_exact", "generalization_win", "generalization_exact", "locality_dkl",
             "locality_top1", "locality_top5", "locality_top10"]
    assert _keys("paper") == paper
    assert _keys("easyedit") == ["efficacy_acc", "generalization_acc", "specificity", "fluency", "target_error",
                                 "final_ratio"]
    assert _keys("curve") == ["efficacy_win", "generalization_win", "efficacy_acc", "generalization_acc",
                              "specificity", "locality_dkl"]
    assert [(m.key, m.label, m.higher_is_better) for m in metrics("scale")] == [
        ("efficacy_exact", "eff. Acc", True), ("generalization_exact", "gen. Acc", True), ("locality_dkl", "DKL", False),
        ("locality_top1", "Top-1", True), ("fluency", "fluency", True), ("final_ratio", "final resid. ratio", False)]
    assert _keys("paired") == ["efficacy_exact", "generalization_exact", "locality_dkl"]
    assert [(m.key, m.label_in("summary")) for m in registry.summary_metrics()] == [
        ("efficacy_win", "eff. Success"), ("efficacy_exact", "eff. Acc"), ("generalization_win", "gen. Success"),
        ("generalization_exact", "gen. Acc"), ("locality_dkl", "DKL"), ("locality_top1", "Top-1"),
        ("locality_top10", "Top-10"), ("efficacy_acc", "token eff."), ("specificity", "locality"),
        ("fluency", "fluency")]


@pytest.fixture()
def toy_metric():
    """A metric registered with one line, removed again after the test."""
    saved = registry.METRICS
    yield register_metric(Metric("toy_length", "toy len", False, ("paper", "scale")))
    registry.METRICS = saved


def _found(key, spread, replay):
    run = lambda values: {"per_edit": [{key: v} for v in values],  # noqa: E731
                          "summary": summarize_ci([{key: v} for v in values], 200, 0), "seconds": 1.0}
    return {"unedited": {}, "sequential": {},
            "batch": {3: {"MEMIT/spread": {"run": run(spread)}, "MEMIT/replay": {"run": run(replay)}}}}


def test_a_registered_metric_reaches_every_table_of_its_groups(toy_metric):
    found = _found("toy_length", [1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    summary = found["batch"][3]["MEMIT/replay"]["run"]["summary"]
    assert summary["toy_length"][0] == 3.0  # bootstrapped with the others
    table = batch_table(found, 3)
    assert table[2][table[0].index("toy len")] == fmt(summary["toy_length"])  # row 2: MEMIT/replay
    paired = paired_table(found, 3, 200, 0)
    assert paired[1][paired[0].index("toy len")] == "+1.00 [+1.00, +1.00]*"
    results = {"unedited": {"summary": summary}, "runs": {"MEMIT/replay": found["batch"][3]["MEMIT/replay"]["run"]}}
    assert table_rows(results, "paper")[0][-2] == "toy len"
    with pytest.raises(ValueError, match="already registered"):
        register_metric(Metric("toy_length", "again"))


def test_run_keys_order_and_styles():
    assert RunKey.parse("AlphaEdit/replay+rekeyed") == RunKey("AlphaEdit", "replay+rekeyed")
    assert RunKey("MEMIT", "replay_tau=0.5").text == "MEMIT/replay_tau=0.5"
    keys = ["Toy/spread", "AlphaEdit/replay", "MEMIT/replay_tau", "MEMIT/blue", "MEMIT/spread", "PMET/replay"]
    assert sorted(keys, key=run_order) == ["MEMIT/spread", "MEMIT/blue", "MEMIT/replay_tau", "PMET/replay",
                                           "AlphaEdit/replay", "Toy/spread"]
    assert mode_style("spread") == ("o", "--") and mode_style("replay_capacity") == (".", "-")


def test_one_formatter():
    assert fmt((0.5, 0.25, 0.75)) == "0.50 [0.25, 0.75]" and fmt((0.5, 0.25, 0.75), 3) == "0.500 [0.250, 0.750]"
    assert fmt((None, None, None)) == "-" and fmt((-0.1, -0.2, 0.0), signed=True) == "-0.10 [-0.20, +0.00]"
    assert marked((0.1, 0.05, 0.2)) == "+0.10 [+0.05, +0.20]*" and marked((0.1, -0.05, 0.2)).endswith("]")


def test_a_comparison_says_what_its_modes_and_edit_time_are(tmp_path):
    """The terminal table and report.md of a compare run (the committed docs/results/cf48_all)
    carry the note on their rows once: what spread and replay are, and that the edit time
    counts statistics and anchors computed on first use (so it is no speed comparison)."""
    import json

    from easyedit_replay.experiments.report import ROWS_NOTE, render_report, write_outputs

    from .conftest import ROOT

    results = json.loads((ROOT / "docs" / "results" / "cf48_all" / "results.json").read_text())
    text = render_report(results)
    assert text.endswith(ROWS_NOTE) and "edit time s" in text[:-len(ROWS_NOTE)]
    report = write_outputs(results, tmp_path, "cf48")["report"].read_text()
    assert report.count(ROWS_NOTE) == 1 and "| edit time s |" in report
    assert "spread: stock backward spreading" in ROWS_NOTE and "first use" in ROWS_NOTE
