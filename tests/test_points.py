"""``easyedit-replay report --points`` and ``report --models``: ``scale`` cells side by side
across operating points or models (:mod:`easyedit_replay.experiments.points`), on copies of
the committed CounterFact cells of ``docs/results/scale_cf`` (the copy at ``paper``
identical but for its ``operating_point``; the copy of ``gemma3-270m`` relabelled to that
model and its layers). No model is loaded; the tests read JSON."""

from __future__ import annotations

import json
import shutil

import pytest

from easyedit_replay.errors import ReplayError
from easyedit_replay.experiments import tables
from easyedit_replay.experiments.cells import collect_cells, update_plan
from easyedit_replay.experiments.metrics import metrics
from easyedit_replay.experiments.points import (
    norm_tables, pair_refusal, pairs, points_markdown, read_points, retention_pairs_table, side_by_side_table,
)

from .conftest import ROOT

CELLS = ROOT / "docs" / "results" / "scale_cf" / "cells"
SERIES = "seq_b0096_n00768"
SEQ = ("sequential", (96, 768))
N_BOOT = 200


def _folder(out, point, series=None, batch=(), plan_point=None, edit=None, n=48):
    """A ``scale --out`` folder ``out`` with copies of the committed cells: ``series``
    ``{"ALG__mode": steps}`` of the 8 x 96 series (steps 1..steps) and the one-batch
    cells ``batch`` of ``n``, each with ``operating_point`` set to ``point`` (left as
    committed, without it, when None), passed through ``edit(path, cell)`` if given;
    ``plan_point``: the point scale.json's meta names."""
    copies = [(CELLS / SERIES / run / f"step{k:03d}.json", out / "cells" / SERIES / run / f"step{k:03d}.json")
              for run, steps in (series or {}).items() for k in range(1, steps + 1)]
    copies += [(CELLS / "batch" / f"n{n:05d}" / f"{run}.json", out / "cells" / "batch" / f"n{n:05d}" / f"{run}.json")
               for run in batch]
    for src, dest in copies:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if point is None and edit is None:
            shutil.copyfile(src, dest)
            continue
        cell = json.loads(src.read_text())
        if point is not None:
            cell["operating_point"] = point
        if edit is not None:
            edit(dest, cell)
        dest.write_text(json.dumps(cell))
    if plan_point is not None:
        update_plan(out, [], {"operating_point": [plan_point]})
    return out


def _stats(found_pairs, text, made):
    return next(q for q in found_pairs if q.text == text and q.made == made)


@pytest.fixture
def twins(tmp_path):
    """``bundled`` (the committed cells, which predate ``operating_point``: the point is
    scale.json's) and ``paper`` (the same cells marked ``paper``): MEMIT spread steps
    1-3, replay steps 1-2, one batch of 48 spread and replay."""
    runs = {"MEMIT__spread": 3, "MEMIT__replay": 2}
    batch = ("MEMIT__spread", "MEMIT__replay")
    return (_folder(tmp_path / "bundled", None, runs, batch, plan_point="bundled"),
            _folder(tmp_path / "paper", "paper", runs, batch))


def one_value(rows, text, made):
    """The batch cells of the one row of ``rows`` with difference ``text`` at ``made`` edits made."""
    [row] = [r for r in rows if r[1] == text and r[2] == made]
    return [c for c in row[3:] if c]


def test_identical_copies_pair_as_the_within_point_tables(twins):
    """On a copy that differs only in its point, ``mode@paper - spread@bundled`` is the
    within-point ``mode - spread`` of ``sequential_paired_table`` / ``paired_table`` (at
    every evaluated step, and the one batch of 48), its mean is the difference of the
    per-edit means, and ``spread@paper - spread@bundled`` is exactly 0."""
    points = read_points(twins)
    assert [p.point for p in points] == ["bundled", "paper"]
    assert [p.from_plan for p in points] == [5 + 2, 0]
    ms = metrics("scale")
    found = points[0].found
    within = tables.sequential_paired_table(found["sequential"][(96, 768)], N_BOOT, 0, ms)
    assert [row[:3] for row in within[1:]] == [["MEMIT", "replay", "96"], ["MEMIT", "replay", "192"]]
    seq = pairs(points, SEQ, n_boot=N_BOOT)
    for row in within[1:]:
        made = int(row[2])
        for text in ("replay@paper - spread@bundled", "replay@paper - spread@paper", "replay@bundled - spread@bundled"):
            assert [tables.marked(_stats(seq, text, made).stats[m.key]) for m in ms] == row[3:], (text, made)
    cell = {k: json.loads((CELLS / SERIES / f"MEMIT__{k}" / "step002.json").read_text()) for k in ("spread", "replay")}
    expected = (sum(r["efficacy_exact"] for r in cell["replay"]["per_edit"])
                - sum(r["efficacy_exact"] for r in cell["spread"]["per_edit"])) / 192
    assert _stats(seq, "replay@paper - spread@bundled", 192).stats["efficacy_exact"][0] == pytest.approx(expected)
    assert _stats(seq, "replay@paper - spread@bundled", 96).stats["efficacy_exact"][0] == pytest.approx(0.0833, abs=1e-4)
    for made in (96, 192, 288):
        same = _stats(seq, "spread@paper - spread@bundled", made)
        assert same.stats == {m.key: (0.0, 0.0, 0.0) for m in ms}
    assert not [q for q in seq if q.reason]
    retained = tables.retention_paired_table(found["sequential"][(96, 768)], N_BOOT, 0)
    assert retained[2][:3] == ["MEMIT", "replay", "192"] and retained[2][4].endswith("*")  # batch 2: +0.08*
    across = retention_pairs_table(seq)
    for row in retained[1:]:
        for text in ("replay@paper - spread@bundled", "replay@bundled - spread@bundled"):
            assert [r for r in across if r[1] == text and r[2] == row[2]] == [["MEMIT", text] + row[2:]]
    assert one_value(across, "spread@paper - spread@bundled", "288") == ["+0.00 [+0.00, +0.00]"] * 3
    assert _stats(seq, "replay@paper - spread@bundled", 192).retention[0][0] == pytest.approx(
        sum(a["efficacy_exact"] - b["efficacy_exact"]
            for a, b in zip(cell["replay"]["per_edit"][:96], cell["spread"]["per_edit"][:96])) / 96)
    one = pairs(points, ("batch", 48), n_boot=N_BOOT)
    assert all(q.retention is None for q in one)
    batch_within = tables.paired_table(found, 48, N_BOOT, 0, ms)
    assert [tables.marked(_stats(one, "replay@paper - spread@bundled", None).stats[m.key]) for m in ms] \
        == batch_within[1][2:]
    # side by side: each paper row repeats its bundled row
    rows = side_by_side_table(points, SEQ)
    assert rows[0][:4] == ["algorithm", "mode", "point", "edits made"]
    assert [r[:4] for r in rows[1:3]] == [["MEMIT", "spread", "bundled", "96"], ["MEMIT", "spread", "paper", "96"]]
    assert rows[1][4:] == rows[2][4:] and rows[1][4] == "0.91 [0.84, 0.96]"
    text = points_markdown(twins, n_boot=N_BOOT)
    assert "## One batch of 48 edits" in text and "## Sequential: 768 edits in batches of 96" in text
    assert text.count("Retention, paired:") == 1  # the sequential series only
    assert "Missing pairs" not in text and "Not paired" not in text
    assert "- `bundled` (reference): " in text and "(7 cells predate the field `operating_point`" in text


def test_update_and_anchor_norms_per_point(tmp_path):
    """The mean |dW| per layer over the steps every point has made, and the anchor and
    target norms where the cells record them (``replay+refresh``'s, not the older
    ``replay``'s)."""
    runs = {"MEMIT__replay": 2, "MEMIT__replay+refresh": 2}
    folders = [_folder(tmp_path / "b", "bundled", runs), _folder(tmp_path / "p", "paper", {"MEMIT__replay": 1,
                                                                                            "MEMIT__replay+refresh": 2})]
    updates, anchors = norm_tables(read_points(folders), SEQ)
    assert updates[0] == ["algorithm", "mode", "point", "steps"] + [f"|dW| layer {l}" for l in range(4, 9)]
    step = [json.loads((CELLS / SERIES / "MEMIT__replay+refresh" / f"step{k:03d}.json").read_text()) for k in (1, 2)]
    w4 = "model.layers.4.mlp.down_proj.weight"
    both = f"{(step[0]['analysis']['update_norm'][w4] + step[1]['analysis']['update_norm'][w4]) / 2:.1f}"
    assert updates[1:] == [["MEMIT", "replay", "bundled", "1", "75.5", "59.6", "37.4", "21.1", "13.0"],
                           ["MEMIT", "replay", "paper", "1", "75.5", "59.6", "37.4", "21.1", "13.0"],
                           ["MEMIT", "replay+refresh", "bundled", "1-2", both] + updates[3][5:],
                           ["MEMIT", "replay+refresh", "paper", "1-2", both] + updates[3][5:]]
    assert anchors[0][4] == "|delta| layer 4"
    delta = sum(s["sequential"]["norms"]["anchor"]["model.layers.4"]["delta"] for s in step) / 2
    assert [row[4] for row in anchors[1:]] == ["-", "-", f"{delta:.2f}", f"{delta:.2f}"]


def test_norm_columns_are_in_layer_order(tmp_path):
    """The |dW| and the anchor and target norm columns go by layer number (layer 10 after
    layer 9, whatever order the cells list them in), the |delta| columns before the |t|
    ones: on replay+refresh cells whose layers 4, 5, 6 are relabelled 10, 9, 2, and whose
    anchor sits at layer 10 at ``bundled`` and at layer 8 at ``paper``."""
    def relabel(anchor_at):
        def edit(path, cell):
            def moved(name, at=None):  # model.layers.{l}[.…] with l moved
                parts = name.split(".")
                parts[2] = str(at or {4: 10, 5: 9, 6: 2}.get(int(parts[2]), int(parts[2])))
                return ".".join(parts)

            analysis = cell["analysis"]
            analysis["update_norm"] = {moved(k): v for k, v in analysis["update_norm"].items()}
            norms = analysis["norms"]
            norms["targets"] = {moved(k): v for k, v in norms["targets"].items()}
            norms["anchor"] = {moved(k, anchor_at): v for k, v in norms["anchor"].items()}
        return edit

    folders = [_folder(tmp_path / point, point, {"MEMIT__replay+refresh": 2}, edit=relabel(at))
               for point, at in (("bundled", 10), ("paper", 8))]
    updates, anchors = norm_tables(read_points(folders), SEQ)
    assert updates[0][4:] == [f"|dW| layer {l}" for l in (2, 7, 8, 9, 10)]
    step = [json.loads((CELLS / SERIES / "MEMIT__replay+refresh" / f"step{k:03d}.json").read_text()) for k in (1, 2)]
    dw = {l: f"{sum(s['analysis']['update_norm'][f'model.layers.{l}.mlp.down_proj.weight'] for s in step) / 2:.1f}"
          for l in (4, 5, 6, 7, 8)}
    assert updates[1][4:] == [dw[6], dw[7], dw[8], dw[5], dw[4]]
    assert anchors[0][4:] == ["|delta| layer 8", "|delta| layer 10"] + [f"|t| layer {l}" for l in (2, 7, 8, 9, 10)]
    mean = {l: f"{sum(s['analysis']['norms']['targets'][f'model.layers.{l}']['norm'] for s in step) / 2:.2f}"
            for l in (4, 5, 6, 7, 8)}
    delta = f"{sum(s['analysis']['norms']['anchor']['model.layers.4']['delta'] for s in step) / 2:.2f}"
    targets = [mean[l] for l in (6, 7, 8, 5, 4)]  # the columns of layers 2, 7, 8, 9, 10
    assert anchors[1:] == [["MEMIT", "replay+refresh", "bundled", "1-2", "-", delta] + targets,
                           ["MEMIT", "replay+refresh", "paper", "1-2", delta, "-"] + targets]


def test_pairs_not_evaluated_yet_are_listed_as_missing(tmp_path):
    """``paper`` has replay at 96 and 192 edits made but spread at 96 only: the pairs
    against spread@paper at 192 are missing, replay@paper - spread@bundled is formed; the
    planned paper cells not finished are listed."""
    bundled = _folder(tmp_path / "b", "bundled", {"MEMIT__spread": 2, "MEMIT__replay": 2})
    paper = _folder(tmp_path / "p", "paper", {"MEMIT__spread": 1, "MEMIT__replay": 2})
    update_plan(paper, [{"kind": "sequential", "batch_size": 96, "total": 768, "step": 2, "edits": 192,
                         "alg": "MEMIT", "mode": "spread"}], {"operating_point": ["paper"]})
    found = pairs(read_points([bundled, paper]), SEQ, n_boot=N_BOOT)
    assert [(q.text, q.made) for q in found if q.missing] == [("spread@paper - spread@bundled", 192),
                                                             ("replay@paper - spread@paper", 192)]
    assert _stats(found, "replay@paper - spread@bundled", 192).stats is not None
    text = points_markdown([bundled, paper], n_boot=N_BOOT)
    assert ("- sequential: 768 edits in batches of 96, 192 edits made, MEMIT: replay@paper - spread@paper: "
            "spread@paper not evaluated") in text
    assert "- paper: sequential 768 in batches of 96, step 2 (192 edits made), MEMIT/spread" in text
    assert "| MEMIT | replay@paper - spread@bundled | 192 | +0.08 [" in text


def test_cells_of_other_records_are_not_paired(tmp_path):
    """A cell whose records digest or evaluated case ids differ is refused, with the
    reason, and its pair is left out of the table."""
    def other_records(path, cell):
        if "MEMIT__spread" in str(path):
            cell["settings"]["records"] = "0" * 32

    bundled = _folder(tmp_path / "b", "bundled", {"MEMIT__spread": 1, "MEMIT__replay": 1})
    paper = _folder(tmp_path / "p", "paper", {"MEMIT__spread": 1, "MEMIT__replay": 1}, edit=other_records)
    cell = json.loads((bundled / "cells" / SERIES / "MEMIT__spread" / "step001.json").read_text())
    assert pair_refusal(cell, cell) is None
    assert pair_refusal(cell, dict(cell, evaluated_cases=cell["evaluated_cases"][::-1])) \
        == "evaluated case ids differ (evaluated_cases)"
    found = pairs(read_points([bundled, paper]), SEQ, n_boot=N_BOOT)
    refused = {q.text: q.reason for q in found if q.reason}
    assert refused == {"spread@paper - spread@bundled": "records differ (settings.records 00000000 vs 54abf96c)",
                       "replay@paper - spread@paper": "records differ (settings.records 54abf96c vs 00000000)"}
    text = points_markdown([bundled, paper], n_boot=N_BOOT)
    assert "Not paired (not the same edits):" in text
    assert "| MEMIT | spread@paper - spread@bundled |" not in text
    assert "| MEMIT | replay@paper - spread@bundled | 96 |" in text


def test_pairs_need_one_model_and_edit_layers_and_name_other_hyperparameters(tmp_path):
    """Cells of another model or other edit layers are not the same edits: refused, with
    the field and both values. Across points the point's anchor settings may differ;
    any other hyperparameter that differs (here lambda, ``mom2_update_weight``) is named
    next to the pair and, with both values, under the table. Within a point the anchor
    settings are named too, and the fields a mode sets (``+refresh``) never are."""
    from easyedit_replay.experiments.points import hparams_differences

    def at(model=None, layers=None, **fields):
        def edit(path, cell):
            hp = cell["settings"]["hparams"]
            hp.update(fields)
            if model:
                hp["model_name"] = model
            if layers:
                hp["layers"] = layers
        return edit

    runs = {"MEMIT__spread": 1, "MEMIT__replay": 1}
    bundled = _folder(tmp_path / "b", "bundled", runs)
    paper = _folder(tmp_path / "p", "paper", runs, edit=at(clamp_norm_factor=0.75, v_lr=0.1, mom2_update_weight=1000))
    found = pairs(read_points([bundled, paper]), SEQ, n_boot=N_BOOT)
    assert {q.text: q.differs for q in found} == {
        "spread@paper - spread@bundled": {"mom2_update_weight": (1000, 5000)},
        "replay@bundled - spread@bundled": {},
        "replay@paper - spread@paper": {},
        "replay@paper - spread@bundled": {"mom2_update_weight": (1000, 5000)}}
    assert all(q.stats is not None for q in found)
    text = points_markdown([bundled, paper], n_boot=N_BOOT)
    assert ("| MEMIT | spread@paper - spread@bundled (mom2_update_weight also differs) | 96 | +0.00 [+0.00, +0.00] |"
            in text)
    assert "| MEMIT | replay@paper - spread@paper | 96 | +0.08 [" in text
    assert "- MEMIT, spread@paper - spread@bundled: mom2_update_weight 1000 vs 5000\n" in text
    assert "- MEMIT, replay@paper - spread@bundled: mom2_update_weight 1000 vs 5000\n" in text
    assert "Not paired" not in text

    cell = json.loads((bundled / "cells" / SERIES / "MEMIT__spread" / "step001.json").read_text())
    clamped = json.loads(json.dumps(cell))
    clamped["settings"]["hparams"]["clamp_norm_factor"] = 0.75
    assert hparams_differences(clamped, cell, across_points=False) == {"clamp_norm_factor": (0.75, 4)}
    assert hparams_differences(clamped, cell, across_points=True) == {}
    refresh = json.loads((CELLS / SERIES / "MEMIT__replay+refresh" / "step001.json").read_text())
    assert refresh["settings"]["hparams"]["sequential_refresh"] is True
    assert hparams_differences(refresh, cell, across_points=False) == {}

    for name, edit, reason in (
            ("g", at(model="gemma3-270m"), "models differ (settings.hparams.model_name gemma3-270m vs smollm2-135m)"),
            ("w", at(layers=[3, 4, 5, 6, 7]),
             "edit layers differ (settings.hparams.layers [3, 4, 5, 6, 7] vs [4, 5, 6, 7, 8])")):
        other = _folder(tmp_path / name, "host-fe", runs, edit=edit)
        found = pairs(read_points([bundled, other]), SEQ, n_boot=N_BOOT)
        refused = {q.text: q.reason for q in found if q.reason}
        assert refused == {"spread@host-fe - spread@bundled": reason, "replay@host-fe - spread@bundled": reason}
        text = points_markdown([bundled, other], n_boot=N_BOOT)
        assert f"- sequential: 768 edits in batches of 96, 96 edits made, MEMIT: spread@host-fe - spread@bundled: " \
               f"{reason}" in text
        assert "| MEMIT | spread@host-fe - spread@bundled |" not in text
        assert "| MEMIT | replay@host-fe - spread@host-fe | 96 |" in text


def test_the_committed_points_pair_with_no_other_hyperparameter(tmp_path):
    """docs/results/scale_cf (bundled) and scale_cf_paper (paper) differ only in the
    paper point's anchor settings: every pair both have evaluated is formed and names
    no other hyperparameter."""
    results = ROOT / "docs" / "results"
    found = pairs(read_points([results / "scale_cf", results / "scale_cf_paper"]), SEQ, ("spread", "replay"),
                  n_boot=N_BOOT)
    formed = [q for q in found if q.stats is not None]
    assert {q.text for q in formed} == {"spread@paper - spread@bundled", "replay@bundled - spread@bundled",
                                        "replay@paper - spread@paper", "replay@paper - spread@bundled"}
    assert all(q.missing for q in found if q.stats is None)
    assert [q.differs for q in formed] == [{}] * len(formed)


def test_the_point_of_a_folder_must_be_one_and_known(tmp_path):
    """A folder whose cells name two points, cells without ``operating_point`` and no
    point in scale.json, two folders at one point, and a reference no folder is at: each
    a ReplayError naming what is wrong."""
    def half_paper(path, cell):
        cell["operating_point"] = "paper" if "replay" in str(path) else "bundled"

    mixed = _folder(tmp_path / "mixed", None, {"MEMIT__spread": 1, "MEMIT__replay": 1}, edit=half_paper)
    with pytest.raises(ReplayError, match=r"more than one operating point \(field `operating_point`: bundled, paper"):
        read_points([mixed])
    unnamed = _folder(tmp_path / "unnamed", None, {"MEMIT__spread": 1})
    with pytest.raises(ReplayError, match="lack the field `operating_point`"):
        read_points([unnamed])
    b1, b2 = (_folder(tmp_path / name, "bundled", {"MEMIT__spread": 1}) for name in ("b1", "b2"))
    with pytest.raises(ReplayError, match="both at operating point bundled"):
        read_points([b1, b2])
    with pytest.raises(ReplayError, match="--reference paper: no folder is at that point"):
        read_points([b1], reference="paper")
    assert collect_cells(b1)["sequential"][(96, 768)]["MEMIT/spread"][0]["operating_point"] == "bundled"


def test_report_points_command(twins, tmp_path, capsys):
    """``report --points DIR DIR --out FILE`` prints the report and writes it; ``report
    SOURCE`` without ``--markdown`` and ``--points`` with a SOURCE are errors."""
    from easyedit_replay.cli import main

    out = tmp_path / "points.md"
    assert main(["report", "--points", *map(str, twins), "--modes", "spread,replay", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text() and printed.startswith("# `scale` cells across operating points")
    assert main(["report", str(twins[0])]) == 2
    assert "give SOURCE --markdown" in capsys.readouterr().err
    assert main(["report", str(twins[0]), "--points", str(twins[1])]) == 2
    capsys.readouterr()
    assert main(["report", "--points", *map(str, twins), "--out", str(tmp_path)]) == 2  # refused before the work
    captured = capsys.readouterr()
    assert "a folder; --out takes the markdown file" in captured.err and captured.out == ""


def test_report_refuses_a_mode_no_cell_has(twins, capsys):
    """``report SOURCE --markdown --modes`` and ``report --points --modes`` with an entry
    that no cell has exit 2 naming the flag, the entry and the modes the cells have (they
    printed empty tables before); entries the cells have still filter the tables; a
    compare results.json refuses ``--modes`` (it is reported whole)."""
    from easyedit_replay.cli import main

    present = "the modes present are spread, replay"
    assert main(["report", str(twins[0]), "--markdown", "--modes", "spread,bogus"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"error: report {twins[0]} --modes spread,bogus: 'bogus' names no mode of the cells; "
                            f"{present}\n")
    assert main(["report", "--points", *map(str, twins), "--modes", "bogus,Replay"]) == 2
    assert capsys.readouterr().err == (f"error: report --points --modes bogus,Replay: 'bogus', 'Replay' name no "
                                       f"mode of the cells; {present}\n")
    assert main(["report", str(twins[0]), "--markdown", "--modes", "replay"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 48 |")]
    assert [row.split(" | ")[1:3] for row in rows] == [["MEMIT", "replay"]]
    results = ROOT / "docs" / "results" / "cf48_all" / "results.json"
    assert main(["report", str(results), "--markdown", "--modes", "spread"]) == 2
    assert "--modes picks the modes of scale cells; a compare results.json is reported whole" in capsys.readouterr().err


def test_report_modes_are_read_as_scale_writes_them(twins, tmp_path, capsys):
    """``--modes`` entries are canonical mode specs, as ``scale`` writes a cell's mode
    (``replay_tau=0.50`` is the cells' ``replay_tau=0.5``, `` replay `` is ``replay``),
    an empty entry (a trailing comma) is ignored, and ``--modes`` with no entry is an
    error naming it; compare, scale and tune read ``--modes`` the same way, refusing an
    entry that is not a mode spec."""
    from easyedit_replay.cli import main, parse_modes

    assert parse_modes("spread, replay_tau=0.50 ,replay + refresh,") == ("spread", "replay_tau=0.5", "replay+refresh")
    assert parse_modes("spread,bogus", strict=False) == ("spread", "bogus")
    with pytest.raises(ReplayError, match="--modes spread,bogus: mode='bogus'; use one of"):
        parse_modes("spread,bogus")
    assert main(["report", "--points", *map(str, twins), "--modes", "spread,replay"]) == 0
    expected = capsys.readouterr().out
    for modes in ("spread,replay,", " replay , spread "):
        assert main(["report", "--points", *map(str, twins), "--modes", modes]) == 0
        assert capsys.readouterr().out == expected
    assert main(["report", "--points", *map(str, twins), "--modes", ","]) == 2
    assert capsys.readouterr().err == ("error: --modes ',': names no mode; give comma-separated modes, e.g. "
                                       "spread,replay\n")
    tau = [_folder(tmp_path / point, point, batch=("MEMIT__spread", "MEMIT__replay_tau=0.5"), n=192)
           for point in ("bundled", "paper")]
    assert main(["report", "--points", *map(str, tau), "--modes", "replay_tau=0.50"]) == 0
    assert "| MEMIT | replay_tau=0.5@paper - spread@bundled | +" in capsys.readouterr().out
    assert main(["report", str(tau[0]), "--markdown", "--modes", "replay_tau=0.50,"]) == 0
    rows = [line.split(" | ")[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("| 192 |")]
    assert rows and set(map(tuple, rows)) == {("MEMIT", "replay_tau=0.5")}


def test_a_mode_at_one_point_only_is_named_and_modes_pick_the_kinds(tmp_path):
    """The report shows the algorithms evaluated at more than one point; a mode of theirs
    that one point only has (``replay+refresh`` at bundled), with or without ``--modes``,
    is named as such under its kind's heading, and is not when every point has it. A
    kind evaluated at more than one point but with no cell of ``--modes`` is left out
    (no empty tables), and the report says no shared kind has such cells."""
    runs = {"MEMIT__spread": 1, "MEMIT__replay": 1}
    bundled = _folder(tmp_path / "b", "bundled", dict(runs, **{"MEMIT__replay+refresh": 1}), batch=("MEMIT__blue",))
    paper = _folder(tmp_path / "p", "paper", runs)
    alone = ("Evaluated at one point only (no other point to compare the run with; its rows and its pairs against "
             "spreading are shown): MEMIT/replay+refresh at bundled.")
    for modes in (None, ["replay+refresh"], ["replay", "replay+refresh"]):
        text = points_markdown([bundled, paper], modes=modes, n_boot=N_BOOT)
        assert text.split("## Sequential: 768 edits in batches of 96\n\n")[1].startswith(alone + "\n"), modes
        assert "| MEMIT | replay+refresh | bundled | 96 |" in text
    assert alone not in points_markdown([bundled, paper], modes=["spread", "replay"], n_boot=N_BOOT)
    text = points_markdown([bundled, paper], modes=["blue"], n_boot=N_BOOT)  # blue: one batch of 48, bundled only
    assert "##" not in text and "|" not in text
    assert "No kind of cell evaluated at more than one point has cells of --modes blue." in text
    from easyedit_replay.experiments.points import single_point_runs

    points = read_points([bundled, paper])
    assert single_point_runs(points, SEQ) == [("MEMIT", "replay+refresh", "bundled")]
    assert single_point_runs(points, SEQ, ["spread", "replay"]) == []


def test_report_points_names_the_points_and_tells_a_tune_folder(twins, tmp_path, capsys):
    """``--reference`` must name a point of the folders given (the error lists them,
    says when it is the default, bundled, and names one to pass instead); a
    ``tune --out`` folder, or one of its point or window folders, is refused as a tune
    folder naming one of its ``scale`` folders, which ``--points`` reads."""
    from easyedit_replay.cli import main

    assert main(["report", "--points", *map(str, twins), "--reference", "papr"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("error: report --points: --reference papr: no folder is at that point "
                            "(points: bundled, paper); pass --reference bundled\n")
    paper, host = (_folder(tmp_path / point, point, {"MEMIT__spread": 1}) for point in ("paper", "host-fe"))
    assert main(["report", "--points", str(paper), str(host)]) == 2  # no --reference: bundled, absent
    assert capsys.readouterr().err == ("error: report --points: --reference bundled (the default): no folder is at "
                                       "that point (points: paper, host-fe); pass --reference paper\n")
    assert main(["report", "--points", str(paper), str(host), "--reference", "paper"]) == 0
    assert "- `paper` (reference): " in capsys.readouterr().out
    tune = tmp_path / "tune"
    lam = _folder(tune / "paper" / "lambda5000", "paper", {"MEMIT__spread": 1}, plan_point="paper")
    windowed = _folder(tmp_path / "wtune" / "paper" / "w4-8" / "lambda5000", "paper", {"MEMIT__spread": 1})
    for folder, scale in ((tune, lam), (tune / "paper", lam), (tmp_path / "wtune", windowed),
                          (tmp_path / "wtune" / "paper", windowed), (tmp_path / "wtune" / "paper" / "w4-8", windowed)):
        assert main(["report", "--points", str(twins[0]), str(folder)]) == 2
        assert capsys.readouterr().err == (f"error: report --points {folder}: is a tune folder; --points reads scale "
                                           f"folders (a tune grid's are its <point>/lambda<L> folders, e.g. {scale})\n")
    assert main(["report", "--points", str(twins[0]), str(lam)]) == 0  # a grid's scale folder is one
    assert f"- `paper`: {lam}" in capsys.readouterr().out


def test_markdown_tables_escape_a_bar_inside_a_cell():
    """``|dW| layer 4`` stays one column of a markdown table: the bar is escaped."""
    from easyedit_replay.experiments.tables import render_markdown

    text = render_markdown([["mode", "|dW| layer 4"], ["replay", "75.5"]])
    assert text.splitlines() == ["| mode | \\|dW\\| layer 4 |", "|---|---|", "| replay | 75.5 |"]
    assert all(line.replace("\\|", "").count("|") == 3 for line in text.splitlines())


def test_scale_report_names_its_operating_point(tmp_path):
    """``report.md`` of a ``scale`` folder says which operating point made it (from
    scale.json), and says nothing of one when the plan does not name it."""
    from easyedit_replay.experiments.report import write_scale_report

    named = _folder(tmp_path / "paper", "paper", {"MEMIT__spread": 1}, plan_point="paper")
    assert "\nOperating point: paper (`scale --point`" in write_scale_report(named, n_boot=N_BOOT).read_text()
    unnamed = _folder(tmp_path / "plain", None, {"MEMIT__spread": 1})
    assert "Operating point" not in write_scale_report(unnamed, n_boot=N_BOOT).read_text()


def test_the_plan_names_its_points_as_a_string_or_a_list(tmp_path):
    """``plan_points`` reads scale.json's ``meta["operating_point"]`` as one name or a
    list; ``report --points`` (for cells without the field) and scale's ``report.md``
    both read it through it, the string form included."""
    from easyedit_replay.experiments.cells import plan_points
    from easyedit_replay.experiments.points import read_point
    from easyedit_replay.experiments.report import write_scale_report

    assert plan_points({"operating_point": "paper"}) == ("paper",)
    assert plan_points({"operating_point": ["bundled", "paper"]}) == ("bundled", "paper")
    assert plan_points({"model": "smollm2-135m"}) == plan_points({"operating_point": []}) == plan_points(None) == ()
    for name, named in (("one", "host-fe"), ("listed", ["host-fe"])):
        folder = _folder(tmp_path / name, None, {"MEMIT__spread": 1})
        update_plan(folder, [], {"operating_point": named})
        point = read_point(folder)
        assert (point.point, point.from_plan) == ("host-fe", 1)
        assert "\nOperating point: host-fe (`scale --point`" in write_scale_report(folder, n_boot=N_BOOT).read_text()
    update_plan(folder, [], {"operating_point": ["bundled", "paper"]})
    with pytest.raises(ReplayError, match="its scale.json names the points bundled, paper; cannot tell"):
        read_point(folder)
    assert "\nOperating point: bundled, paper (`scale --point`" in write_scale_report(folder, n_boot=N_BOOT).read_text()


# ----------------------------------------------------------------------------- report --models

GEMMA = "gemma3-270m"
BATCH = ("MEMIT__spread", "MEMIT__replay", "MEMIT__blue")


def _committed(n, run):
    return json.loads((CELLS / "batch" / f"n{n:05d}" / f"{run}.json").read_text())


def _as_gemma(replay_is_blue=False, records=None):
    """An ``edit`` of :func:`_folder` that makes a copy a ``gemma3-270m`` cell: its model
    name, its edit layers and the layers of its |dW| moved up by 6 (layers 10-14);
    ``replay_is_blue``: a one-batch replay cell takes the committed blue cell's rows and
    summary (so its pair against spreading is not SmolLM2's); ``records``: another records digest."""
    def edit(path, cell):
        hp = cell["settings"]["hparams"]
        hp["model_name"], hp["layers"] = GEMMA, [layer + 6 for layer in hp["layers"]]
        if records:
            cell["settings"]["records"] = records
        if cell["kind"] != "batch":
            return
        if replay_is_blue and cell["mode"] == "replay":
            cell["run"] = _committed(cell["n"], "MEMIT__blue")["run"]
        for a in cell["run"]["analyses"]:
            a["update_norm"] = {f"model.layers.{int(k.split('.')[2]) + 6}.mlp.down_proj.weight": v
                                for k, v in a["update_norm"].items()}
    return edit


@pytest.fixture
def two_models(tmp_path):
    """``smollm2-135m`` (the committed cells: one batch of 48, MEMIT spread, replay and
    blue; the 8 x 96 series, MEMIT spread and replay steps 1-2) and ``gemma3-270m`` (the
    same cells relabelled, its one-batch replay holding the blue cell's rows; no blue)."""
    series = {"MEMIT__spread": 2, "MEMIT__replay": 2}
    smol = _folder(tmp_path / "smol", None, series, BATCH)
    gemma = _folder(tmp_path / "gemma", None, series, BATCH[:2], edit=_as_gemma(replay_is_blue=True))
    return smol, gemma


def test_models_side_by_side_and_paired_within_each_model(two_models):
    """``report --models``: one row per algorithm, mode and model; pairs ``mode@M -
    spread@M`` within each model only, each the paired difference of its own per-edit
    rows (Gemma's replay here holds the blue cell's rows); each model's |dW| table at its
    own layers; Gemma's weights named Q4_K_M dequantized in the header."""
    from easyedit_replay.experiments.points import MODELS, models_markdown, read_models, single_point_runs
    from easyedit_replay.experiments.statistics import paired_difference
    from easyedit_replay.models import weights_note

    groups = read_models(two_models)
    assert [(g.group, g.axis) for g in groups] == [("smollm2-135m", MODELS), (GEMMA, MODELS)]
    one = ("batch", 48)
    rows = side_by_side_table(groups, one)
    assert rows[0][:4] == ["algorithm", "mode", "model", "eff. Acc"]
    assert [r[:4] for r in rows[1:]] == [["MEMIT", "spread", "smollm2-135m", "0.92 [0.83, 0.98]"],
                                         ["MEMIT", "spread", GEMMA, "0.92 [0.83, 0.98]"],
                                         ["MEMIT", "replay", "smollm2-135m", "0.98 [0.94, 1.00]"],
                                         ["MEMIT", "replay", GEMMA, "0.92 [0.83, 0.98]"],
                                         ["MEMIT", "blue", "smollm2-135m", "0.92 [0.83, 0.98]"]]
    assert single_point_runs(groups, one) == [("MEMIT", "blue", "smollm2-135m")]

    found = pairs(groups, one, n_boot=N_BOOT)
    assert [q.text for q in found] == ["replay@smollm2-135m - spread@smollm2-135m", f"replay@{GEMMA} - spread@{GEMMA}",
                                       "blue@smollm2-135m - spread@smollm2-135m"]
    assert not [q for q in found if q.reason]
    spread, replay, blue = (_committed(48, run)["run"]["per_edit"] for run in BATCH)
    for metric in ("efficacy_exact", "fluency"):
        assert _stats(found, f"replay@{GEMMA} - spread@{GEMMA}", None).stats[metric] \
            == paired_difference(blue, spread, metric, N_BOOT, 0)
        assert _stats(found, "replay@smollm2-135m - spread@smollm2-135m", None).stats[metric] \
            == paired_difference(replay, spread, metric, N_BOOT, 0)
    assert _stats(found, f"replay@{GEMMA} - spread@{GEMMA}", None).stats["efficacy_exact"][0] == pytest.approx(0.0)
    assert _stats(found, "replay@smollm2-135m - spread@smollm2-135m", None).stats["efficacy_exact"][0] \
        == pytest.approx((sum(r["efficacy_exact"] for r in replay) - sum(r["efficacy_exact"] for r in spread)) / 48)
    seq = pairs(groups, SEQ, n_boot=N_BOOT)
    assert [(q.text, q.made) for q in seq] == [(f"replay@{m} - spread@{m}", made) for m in ("smollm2-135m", GEMMA)
                                               for made in (96, 192)]
    assert [len(q.retention) for q in seq] == [1, 2, 1, 2]

    updates, _ = norm_tables(groups, one, only=GEMMA)
    assert updates[0] == ["algorithm", "mode", "model"] + [f"|dW| layer {l}" for l in range(10, 15)]
    assert [r[:3] for r in updates[1:]] == [["MEMIT", "spread", GEMMA], ["MEMIT", "replay", GEMMA]]
    assert updates[2][3:] == ["54.2", "-", "-", "-", "60.9"]  # the blue cell's |dW| at layers 4 and 8, moved to 10, 14
    assert norm_tables(groups, one, only="smollm2-135m")[0][0][3] == "|dW| layer 4"

    assert "Q4_K_M" in weights_note(GEMMA) and weights_note(GEMMA.upper()) == weights_note(GEMMA)
    assert weights_note(str(two_models[1])) == ""
    text = models_markdown(two_models, n_boot=N_BOOT)
    assert text.startswith("# `scale` cells across models\n\n"
                           f"- `smollm2-135m`: {two_models[0]} (weights: {weights_note('smollm2-135m')})\n"
                           f"- `{GEMMA}`: {two_models[1]} (weights: the Q4_K_M quantization, dequantized to float32, "
                           "not Google's bfloat16 release)\n")
    assert "No pair crosses models" in text and "spread@smollm2-135m - spread@" not in text
    assert "Not paired" not in text and "Missing pairs" not in text
    assert ("Evaluated at one model only (no other model to compare the run with; its rows and its pairs against "
            "spreading are shown): MEMIT/blue at smollm2-135m.") in text
    assert text.count(f"`{GEMMA}`:\n") == 2 and text.count("`smollm2-135m`:\n") == 2  # |dW| tables, 2 kinds
    assert "Retention, paired:" in text and f"| MEMIT | replay@{GEMMA} - spread@{GEMMA} | 192 |" in text


def test_report_models_command_and_its_refusals(two_models, tmp_path, capsys):
    """``report --models A B --out FILE`` prints the report and writes it (naming the
    operating point scale.json records); one folder, ``--points`` with it, a SOURCE,
    ``--allocation``, ``--reference``, two folders of one model, folders with no kind of
    cell in common or with one on other records, a folder as ``--out`` and a mode no cell
    has are each refused with exit 2, naming the option and the fix."""
    from easyedit_replay.cli import main

    smol, gemma = map(str, two_models)
    update_plan(two_models[1], [], {"model": GEMMA, "operating_point": ["bundled"]})
    out = tmp_path / "models.md"
    assert main(["report", "--models", smol, gemma, "--modes", "spread,replay", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert f"- `{GEMMA}`: {gemma} (operating point bundled; weights: the Q4_K_M" in printed
    assert "| MEMIT | blue |" not in printed

    other = _folder(tmp_path / "smol2", None, batch=BATCH)
    only192 = _folder(tmp_path / "g192", None, batch=BATCH[:2], n=192, edit=_as_gemma())
    moved = _folder(tmp_path / "grec", None, batch=BATCH[:2], edit=_as_gemma(records="0" * 32))
    refused = {
        (smol,): f"report --models {smol}: one folder; --models sets the scale folders of two or more models side "
                 "by side (e.g. report --models docs/results/scale_cf docs/results/scale_cf_gemma3); one folder's "
                 "tables: report DIR --markdown",
        (smol, gemma, "--points", smol): "report --points and --models: give one of them (--points: one model's "
                                         "folders at several operating points; --models: the folders of several "
                                         "models)",
        (smol, gemma, "--allocation"): "report --models DIR [DIR ...] takes the scale --out folders after --models; "
                                       "no SOURCE, no --allocation",
        (smol, gemma, "--reference", "paper"): "report --models --reference paper: --reference is the point --points "
                                               "compares spreading at; --models pairs within each model (drop "
                                               "--reference)",
        (smol, str(other)): f"report --models: {smol} and {other} are both of model smollm2-135m "
                            "(settings.hparams.model_name); give one folder per model (one model's operating points: "
                            "report --points)",
        (smol, str(only192)): f"report --models: {smol} and {only192} have no kind of cell in common "
                              f"(smollm2-135m: one batch of 48 edits, sequential: 768 edits in batches of 96; {GEMMA}: "
                              f"one batch of 192 edits); run `scale` for {GEMMA} with the --data, --records and --n "
                              f"(or --batch-size) of {smol}",
        (smol, str(moved)): f"report --models: {smol} and {moved} hold one batch of 48 edits on other records "
                            f"(settings.records 29b80cb5 vs 00000000); run `scale` for {GEMMA} with the --data and "
                            f"--records of {smol}",
        (smol, gemma, "--out", str(tmp_path)): f"report --models --out {tmp_path}: a folder; --out takes the markdown "
                                               f"file to write, e.g. {tmp_path / 'models.md'}",
        (smol, gemma, "--modes", "bogus"): "report --models --modes bogus: 'bogus' names no mode of the cells; the "
                                           "modes present are spread, replay, blue",
    }
    for given, message in refused.items():
        assert main(["report", "--models", *given]) == 2, given
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", f"error: {message}\n"), given
    assert main(["report", smol, "--models", gemma, smol]) == 2
    assert capsys.readouterr().err.startswith("error: report --models DIR [DIR ...] takes the scale --out folders")


def test_a_models_folder_has_one_known_model(tmp_path):
    """A folder whose cells name two models, or none (and no model in scale.json), is
    refused naming ``settings.hparams.model_name``; with no cell, scale.json's model is its model."""
    from easyedit_replay.experiments.points import read_model

    def half_gemma(path, cell):
        if "replay" in str(path):
            _as_gemma()(path, cell)

    mixed = _folder(tmp_path / "mixed", None, batch=BATCH[:2], edit=half_gemma)
    with pytest.raises(ReplayError, match=r"more than one model \(settings.hparams.model_name: gemma3-270m, "
                                          r"smollm2-135m\); give each model a folder of its own"):
        read_model(mixed)

    def unnamed(path, cell):
        del cell["settings"]["hparams"]["model_name"]

    with pytest.raises(ReplayError, match="1 of its cells lack settings.hparams.model_name"):
        read_model(_folder(tmp_path / "unnamed", None, batch=BATCH[:1], edit=unnamed))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReplayError, match="it has no cells, and no scale.json; cannot tell its model"):
        read_model(empty)
    update_plan(empty, [{"kind": "batch", "n": 48, "alg": "MEMIT", "mode": "spread"}], {"model": GEMMA})
    assert read_model(empty).group == GEMMA


def test_a_kind_two_later_models_share_is_checked_for_its_records(tmp_path):
    """Three folders: a kind that the first folder lacks but the second and third hold (the
    8 x 96 series) is paired within each model and set side by side, so it must be on the
    same records in both; the third folder's series on other records is refused, naming
    the second folder (the first to hold the series), the kind and the two digests."""
    from easyedit_replay.experiments.points import read_models

    def as_model(name, records=None):
        def edit(path, cell):
            cell["settings"]["hparams"]["model_name"] = name
            if records and cell["kind"] != "batch":
                cell["settings"]["records"] = records
        return edit

    series = {"MEMIT__spread": 1, "MEMIT__replay": 1}
    smol = _folder(tmp_path / "smol", None, batch=BATCH[:2])
    gemma = _folder(tmp_path / "gemma", None, series, BATCH[:2], edit=_as_gemma())
    other = _folder(tmp_path / "other", None, series, BATCH[:2], edit=as_model("other-model", records="0" * 32))
    with pytest.raises(ReplayError) as refused:
        read_models([smol, gemma, other])
    assert str(refused.value) == (
        f"report --models: {gemma} and {other} hold sequential: 768 edits in batches of 96 on other records "
        f"(settings.records 54abf96c vs 00000000); run `scale` for other-model with the --data and --records "
        f"of {gemma}")
    same = _folder(tmp_path / "same", None, series, BATCH[:2], edit=as_model("other-model"))
    assert [g.group for g in read_models([smol, gemma, same])] == ["smollm2-135m", GEMMA, "other-model"]
