"""The command line refuses options that would do nothing where they are given: ``report``'s
``--out`` and ``--reference`` without ``--allocation`` / ``--points``, ``--allocation`` with
a scale folder, and ``scale``'s sequential-only options without ``--sequential``. Each
refusal exits 2 naming the flag and the fix, and writes nothing. Every option of every
subcommand has a help text. No model is loaded (the help that says when each option
applies: tests/test_docs.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
        "and plots) or the --points / --models markdown; without them it would write nothing (drop --out, or add "
        "--allocation)\n")
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


def test_help_states_the_defaults_and_where_an_option_is_not_read():
    """The options a newcomer meets state their defaults: how many edits ``compare`` makes
    without ``--n`` (the bundled demo set's real size), that it writes nothing without ``--out``,
    what ``--seed`` seeds (the bootstrap's default is 0, not the YAML's context_seed), that
    AlphaEdit does not read ``--lambda`` (its solve regularizes with L2), that ``scale
    --sequential`` needs ``--batch-size``, and ``anchors bank``'s ``--point`` and ``--shard``."""
    from easyedit_replay.data import load_records

    sub = dict(_commands(build_parser()))
    compare, scale, bank = (_help(sub[words]) for words in [("compare",), ("scale",), ("anchors", "bank")])
    assert (f"--n N use the first N edits (default: all of --data; the bundled demo set has "
            f"{len(load_records())})") in compare
    assert "--out OUT directory for report.md, results.json and PNG plots (default: none, the tables are only " \
           "printed)" in compare
    for text in (compare, scale):
        assert ("--seed SEED seed of the context templates (default: the YAML's context_seed) and of the bootstrap "
                "intervals (default 0)") in text
        assert "for MEMIT, PMET and EMMET; AlphaEdit's solve regularizes with L2 and does not read it" in text
    assert "--batch-size BATCH_SIZE edits per batch of a --sequential run (required with it)" in scale
    assert "--point POINT operating point of the bundled YAML: bundled (default), paper or host-fe" in bank
    assert "(1 <= j <= k; default 1/1, every request)" in bank


# ----------------------------------------------------------------------------- bad input, before the model loads


class _WouldLoad(Exception):
    """Raised in place of loading the model: the input passed every check."""


@pytest.fixture()
def no_model(monkeypatch):
    """``cli._load`` raises :class:`_WouldLoad` instead of loading a model, so a check that is
    missing shows as that exception, never as a run."""
    import easyedit_replay.cli as cli

    def refuse(args, prep):
        raise _WouldLoad(prep)

    monkeypatch.setattr(cli, "_load", refuse)


@pytest.mark.parametrize("argv, message", [
    # parsed with int() (a traceback), or silently ignored when empty or 0
    (["--layers", "4,x"], "--layers '4,x': expected comma-separated layer indices, e.g. 3,4,5,6,7"),
    (["--layers", ""], "--layers '': expected comma-separated layer indices, e.g. 3,4,5,6,7"),
    (["--steps", "0"], "hparams.v_num_grad_steps = 0: must be a positive integer"),
    (["--lambda", "nan"], "hparams.mom2_update_weight = nan: must be a non-negative number"),
    (["--stats-dir", __file__], f"--stats-dir {__file__}: hparams.stats_dir = '{__file__}': is a file"),
    # accepted, then chunked by 0 or a negative size
    (["--batch-size", "0"], "--batch-size 0: expected a positive number of edits per batch"),
    (["--batch-size", "-2", "--sequential"], "--batch-size -2: expected a positive number of edits per batch"),
    # named a YAML path that does not exist, not the algorithm
    (["--algs", "memit"], "--algs memit: not an algorithm of the plugin; use names from MEMIT, PMET, EMMET, "
                          "AlphaEdit (did you mean 'MEMIT'?)"),
    (["--algs", "MEMIT_REPLAY"], "--algs MEMIT_REPLAY: --algs takes base algorithms (MEMIT); the target "
                                 "construction is --modes (replay)"),
    # made the same cells twice
    (["--modes", "spread,replay,replay_tau=0.5,replay_tau=0.50"],
     "--modes spread,replay,replay_tau=0.5,replay_tau=0.50: replay_tau=0.5 is given twice; give each mode once"),
    # refused only at the edit of that mode, after the model loaded and the earlier modes ran
    (["--algs", "MEMIT", "--modes", "spread,replay+refresh+rekeyed"],
     "--modes replay+refresh+rekeyed with MEMIT: hparams.sequential_refresh = True: restores the earlier edits"),
    (["--algs", "MEMIT,PMET", "--modes", "spread,replay+refresh"],
     "--modes replay+refresh with PMET: sequential_refresh restores block-output states (layer_module_tmp); "
     "PMET's targets are module outputs"),
    (["--algs", "MEMIT", "--modes", "replay_capacity+refresh"],
     "--modes replay_capacity+refresh with MEMIT: sequential_refresh: replay_capacity sizes each request's share"),
    (["--algs", "PMET", "--modes", "spread,replay_joint"], "--modes replay_joint with PMET: alg_name PMET_REPLAY_JOINT: "),
])
def test_compare_refuses_bad_input_before_the_model_loads(no_model, capsys, argv, message):
    """Each of these passed ``compare``'s checks (or crashed with a traceback) and failed, if at
    all, after the model loaded; now an error naming the flag, exit 2, no model."""
    assert main(["compare", "--n", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}"), err


def test_compare_refuses_an_out_that_is_a_file(no_model, tmp_path, capsys):
    """``compare --out FILE`` ran every edit and crashed writing the report."""
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert main(["compare", "--n", "2", "--out", str(a_file)]) == 2
    assert capsys.readouterr().err == f"error: --out {a_file} is a file; give a folder for report.md and the plots\n"


def test_records_take_a_negative_start(no_model):
    """``--records -2:`` (the help's example for the last records) was refused by argparse as a
    missing argument; it selects the last two records."""
    with pytest.raises(_WouldLoad) as info:
        main(["compare", "--records", "-2:"])
    assert [r["case_id"] for r in info.value.args[0].records] == [22, 23]


def _plan(out: Path, data: str, records: str = ":"):
    out.mkdir(parents=True)
    (out / "scale.json").write_text(json.dumps({"planned": [], "meta": {
        "model": "smollm2-135m", "data": data, "records": records, "operating_point": ["bundled"]}}))


def test_scale_refuses_bad_input_before_the_model_loads(no_model, tmp_path, capsys):
    """A batch size above the series, an attribution step past it, an --out that is a file, and
    an --out holding cells of another data file or records range were checked after the model
    loaded (the last two after ``scale.json`` had been rewritten with the new data)."""
    out = tmp_path / "s"
    base = ["scale", "--plan-only", "--algs", "MEMIT", "--n", "4", "--out", str(out)]
    assert main(base + ["--sequential", "--batch-size", "10"]) == 2
    assert capsys.readouterr().err == "error: --batch-size 10: a sequential run needs a batch size in 1..4 (the largest --n)\n"
    assert main(base + ["--sequential", "--batch-size", "2", "--attribution", "9"]) == 2
    assert capsys.readouterr().err.startswith("error: --attribution 9: steps of a --sequential series")
    assert not out.exists()
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert main(["scale", "--plan-only", "--algs", "MEMIT", "--n", "4", "--out", str(a_file)]) == 2
    assert capsys.readouterr().err == f"error: --out {a_file} is a file; give the folder of the scale cells\n"
    _plan(out, "../shared/data/counterfact/counterfact-val.json")
    before = (out / "scale.json").read_text()
    assert main(base) == 2
    assert capsys.readouterr().err == (
        f"error: --out {out} holds cells of --data ../shared/data/counterfact/counterfact-val.json --records : "
        f"(this run: --data demo --records :); pass those, or another --out\n")
    assert (out / "scale.json").read_text() == before
    other = tmp_path / "t"
    _plan(other, "demo", "0:8")
    assert main(["scale", "--plan-only", "--algs", "MEMIT", "--n", "4", "--out", str(other), "--records=4:12"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {other} holds cells of --data demo --records 0:8 ")
    assert main(["scale", "--plan-only", "--algs", "MEMIT", "--n", "4", "--out", str(other), "--records", "0:8"]) == 0


def test_scale_report_only_refuses_an_out_without_cells(tmp_path, capsys):
    """``scale --report-only`` on a mistyped --out created the folder and wrote an empty report."""
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for out in (missing, empty):
        assert main(["scale", "--report-only", "--out", str(out)]) == 2
        assert capsys.readouterr().err == (f"error: --out {out}: no scale cells here (no scale.json, no cells/); "
                                           f"give the --out folder of a scale run\n")
    assert not missing.exists() and list(empty.iterdir()) == []
