"""The command line refuses options that would do nothing where they are given: ``report``'s
``--out`` and ``--reference`` without ``--allocation`` / ``--points``, ``--allocation`` with
a scale folder, and ``scale``'s sequential-only options without ``--sequential``. Each
refusal exits 2 naming the flag and the fix, and writes nothing. Every option of every
subcommand has a help text. No model is loaded (the help that says when each option
applies: tests/test_docs.py)."""

from __future__ import annotations

import argparse

import pytest

from easyedit_replay.cli import SEQUENTIAL_ONLY, build_parser, main

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


def _commands(parser, prefix=()):
    """``(words, parser)`` for every subcommand of ``parser``, nested ones (``anchors bank``) too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _commands(sub, prefix + (name,))


def _help(parser) -> str:
    return " ".join(parser.format_help().split())


def test_every_option_of_every_subcommand_has_help():
    """``stats --help`` listed ``--hparams``, ``--model``, ``--stats-dir`` and ``--device`` with
    no text (and ``make-corpus`` all its options): every option, positional or not, of every
    subcommand says what it does (``argparse.SUPPRESS``, a hidden option, counts as said)."""
    bare = {" ".join(words): [a.option_strings[-1] if a.option_strings else a.dest
                              for a in sub._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
            for words, sub in _commands(build_parser())}
    assert {cmd: opts for cmd, opts in bare.items() if opts} == {}
    assert {"stats", "make-corpus", "anchors bank", "anchors info"} <= set(bare)


def test_help_says_how_stats_checks_and_what_algs_defaults_to():
    """``stats``'s "compute (or check)" says how it checks (a file already there is read and
    checked, not recomputed); ``--algs`` names its default from ``--model`` (the code reads
    ``bundled_algorithms(model)``), not from SmolLM2 alone; ``--target-accuracy`` says why it
    costs (it was "(dear)")."""
    sub = dict(_commands(build_parser()))
    top = _help(build_parser())
    assert "compute (or check) covariance statistics for a YAML: files already in the statistics folder are " \
           "checked, not recomputed" in top
    stats = _help(sub[("stats",)])
    assert "A module whose file is already in the statistics folder is checked instead" in stats
    assert "--force recompute and overwrite the files even if they exist" in stats
    for cmd in ("compare", "scale"):
        assert ("--algs ALGS comma-separated base algorithms (default: every one with a bundled YAML for --model, "
                "hparams/<ALG>_REPLAY/<model>.yaml; SmolLM2's without --model)") in _help(sub[(cmd,)])
    scale = _help(sub[("scale",)])
    assert "(expensive: reads every context template to the loss layer again)" in scale and "dear" not in scale
