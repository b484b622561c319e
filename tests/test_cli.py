"""The command line refuses options that would do nothing where they are given: ``report``'s
``--out`` and ``--reference`` without ``--allocation`` / ``--points``, ``--allocation`` with
a scale folder, and ``scale``'s sequential-only options without ``--sequential``. Each
refusal exits 2 naming the flag and the fix, and writes nothing. No model is loaded (the
help that says when each option applies: tests/test_docs.py)."""

from __future__ import annotations

import pytest

from easyedit_replay.cli import SEQUENTIAL_ONLY, main

from .conftest import ROOT

RESULTS = ROOT / "docs" / "results"


def test_report_refuses_options_that_would_do_nothing(tmp_path, capsys):
    """``report SOURCE --markdown --out X`` (no --allocation) wrote nothing and exited 0;
    ``--reference`` without --points was ignored; ``--allocation`` on a scale folder named
    the wrong thing; ``--allocation`` without ``--markdown`` got a message without it."""
    scale_cf, compare = RESULTS / "scale_cf", RESULTS / "cf48_all" / "results.json"
    out = tmp_path / "out"
    assert main(["report", str(scale_cf), "--markdown", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"error: report --out {out}: --out writes the --allocation report of a compare results.json (report.md "
        "and plots) or the --points markdown; without them it would write nothing (drop --out, or add --allocation)\n")
    assert not out.exists()
    assert main(["report", str(compare), "--markdown", "--reference", "paper"]) == 2
    assert capsys.readouterr().err == (
        "error: report --reference paper: --reference is the point --points compares spreading at; SOURCE is "
        "reported as it is (drop --reference, or give --points DIR [DIR ...])\n")
    assert main(["report", str(scale_cf), "--markdown", "--allocation"]) == 2
    assert capsys.readouterr().err == (
        f"error: report {scale_cf} --allocation: a scale --out folder; --allocation reads a compare results.json "
        f"(`compare --out DIR` writes DIR/results.json; a scale folder holds one per size, e.g. "
        f"{scale_cf / 'n00048' / 'results.json'})\n")
    assert main(["report", str(compare), "--allocation"]) == 2
    assert capsys.readouterr().err.startswith(f"error: report {compare} --allocation: add --markdown (the format); ")
    # the options where they apply still work
    assert main(["report", str(compare), "--markdown"]) == 0
    assert "| MEMIT | replay |" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value,why", [
    ("--batch-size", "4", "one-batch cells edit all n at once"),
    ("--curve", None, "one-batch cells are evaluated once, at their n"),
    ("--attribution", "2", "it names steps of the series"),
])
def test_scale_refuses_sequential_options_without_sequential(tmp_path, capsys, flag, value, why):
    """``scale --curve`` without --sequential was accepted (and ignored) while --batch-size and
    --attribution were refused: one refusal for every option of ``SEQUENTIAL_ONLY``, before
    the plan is written."""
    assert [f for _, f, _ in SEQUENTIAL_ONLY] == ["--batch-size", "--curve", "--attribution"]
    out = tmp_path / "s"
    given = [flag] + ([value] if value else [])
    assert main(["scale", "--plan-only", "--n", "8", "--algs", "MEMIT", *given, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {flag} is for --sequential runs: {why}; add --sequential or drop {flag}\n"
    assert not out.exists()
