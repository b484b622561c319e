"""Docs that stay true: the README's length and generated table, the commands and links
of every document, and the lists in docs/ that must name everything registered or
shipped. None of these tests loads a model."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

from .conftest import ROOT, results_section

README = ROOT / "README.md"
DOCS = ROOT / "docs"
# Documents whose fenced commands must use existing CLI options (CHANGELOG.md may name removed ones).
COMMAND_DOCS = [README, ROOT / "CONTRIBUTING.md", ROOT / "hparams" / "README.md", *sorted(DOCS.glob("*.md")),
                *sorted(DOCS.glob("results/*/README.md"))]
# ... and the committed reports, whose links are their plots
LINK_DOCS = COMMAND_DOCS + [ROOT / "CHANGELOG.md", *sorted(set(DOCS.glob("results/**/*.md")) - set(COMMAND_DOCS))]
README_MAX_LINES = 200


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the README


def test_readme_is_an_entry_point_of_at_most_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_algorithm_table_is_generated_from_the_registries():
    """The README's table of algorithms x constructions is what ``scripts/algorithm_table.py``
    makes from ``algorithms.RULES`` and ``targets.CONSTRUCTIONS`` (``--write`` updates it)."""
    from easyedit_replay.algorithms import RULES, algorithm_names
    from easyedit_replay.targets import CONSTRUCTIONS

    tables = _script("algorithm_table")
    in_readme = tables.readme_block(README.read_text())
    assert in_readme == tables.block(), "README.md's algorithm table is stale: run python scripts/algorithm_table.py --write"
    rows = [line for line in in_readme.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(CONSTRUCTIONS)
    names = set(re.findall(r"`([A-Za-z]+_[A-Z_]+)`", in_readme))
    refused = {f"{base}_{c.suffix}" for base in RULES for c in CONSTRUCTIONS.values()
               if f"{base} x `{c.name}` is refused" in in_readme}
    assert refused == {"PMET_REPLAY_JOINT"}  # PMET's two module-output sites are not the block output
    assert names | refused == set(algorithm_names())


def _paired(cell: str) -> str:
    """``"+0.07 [+0.03, +0.12]*"`` -> ``"+0.07*"``."""
    mean = cell.split(" ")[0]
    return mean + ("*" if cell.endswith("*") else "")


def _results_rows(section: str):
    """``{(n, algorithm, mode): [eff - spread, gen - spread, DKL - spread]}`` of the
    paired tables in ``section`` of docs/results.md."""
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[0].isdigit():
            rows[(int(cells[0]), cells[1], cells[2])] = [_paired(cells[i]) for i in (4, 6, 8)]
    return rows


def test_readme_headline_table_is_read_off_docs_results():
    """Each cell of the README's results table is replay's paired difference (efficacy /
    generalization / DKL) in docs/results.md: CounterFact one batch at 48, 192 and 768,
    and the sequential 8 x 96 series at 768 edits made ("not run" where there is no row)."""
    one_batch = _results_rows(results_section("### Measured: CounterFact one batch", ("\nZsRE:",)))
    sequential = _results_rows(results_section("### Sequential: 768 edits as 8 x 96",
                                               ("\n## Sharing the replayed residual",)))
    readme = README.read_text()
    table = readme[readme.index("<!-- headline table"):].split("\n\n")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| algorithm")]
    assert [row.split("|")[1].strip() for row in rows] == ["MEMIT", "PMET", "EMMET", "AlphaEdit"]
    for row in rows:
        alg, *cells = [c.strip() for c in row.strip().strip("|").split("|")]
        sources = [one_batch.get((48, alg, "replay")), one_batch.get((192, alg, "replay")),
                   one_batch.get((768, alg, "replay")), sequential.get((768, alg, "replay"))]
        for cell, source in zip(cells, sources):
            assert cell == ("not run" if source is None else " / ".join(source)), (alg, cell, source)


# ----------------------------------------------------------------------------- commands and links


def _fenced_commands(text: str):
    """Every ``easyedit-replay ...`` command in the fenced code blocks of ``text``, as token
    lists (continuation lines joined, comments dropped)."""
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", line):
                words = shlex.split(part, comments=True) if "easyedit-replay" in part else []
                if "easyedit-replay" in words:
                    yield words[words.index("easyedit-replay") + 1:]


def _options_of(parser):
    return {s for action in parser._actions for s in action.option_strings}


def _subparsers(parser):
    return next((a.choices for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), {})


def _unknown_options(words, parser):
    """The options in ``words`` (an ``easyedit-replay`` command without the program name)
    that the parser of its subcommand does not have; a missing subcommand is one too."""
    allowed = _options_of(parser)
    while True:
        choices = _subparsers(parser)
        positional = [w for w in words if not w.startswith("-")]
        if not choices or not positional:
            break
        if positional[0] not in choices:
            return [f"subcommand {positional[0]!r}"]
        parser = choices[positional[0]]
        allowed |= _options_of(parser)
        words = words[words.index(positional[0]) + 1:]
    return [w.split("=")[0] for w in words if re.match(r"--?[A-Za-z]", w) and w.split("=")[0] not in allowed]


def test_fenced_commands_use_only_options_the_cli_has():
    from easyedit_replay.cli import build_parser

    parser = build_parser()
    found, bad = 0, {}
    for doc in COMMAND_DOCS:
        for words in _fenced_commands(doc.read_text()):
            found += 1
            unknown = _unknown_options(words, parser)
            if unknown:
                bad.setdefault(doc.relative_to(ROOT).as_posix(), []).append((" ".join(words), unknown))
    assert found >= 10, "no easyedit-replay commands were found in the docs' fenced blocks"
    assert bad == {}


def test_the_command_check_finds_a_wrong_option_and_a_wrong_subcommand():
    from easyedit_replay.cli import build_parser

    parser = build_parser()
    text = "```bash\neasyedit-replay compare --n 8 \\\n    --no-such-option 3   # a comment --ignored\n```\n" \
           "```\nOMP_NUM_THREADS=1 easyedit-replay anchors info --data f:8 && easyedit-replay anchors nope\n```\n"
    commands = list(_fenced_commands(text))
    assert [_unknown_options(w, parser) for w in commands] == [["--no-such-option"], [], ["subcommand 'nope'"]]


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _broken_links(doc: Path):
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)  # links in code are not links
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            yield target, "no such file"
        elif fragment and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
            if fragment not in {_slug(h) for h in headings}:
                yield target, "no such heading"


def test_relative_links_point_at_existing_files_and_headings():
    bad = {doc.relative_to(ROOT).as_posix(): list(_broken_links(doc)) for doc in LINK_DOCS if doc.exists()}
    assert {doc: links for doc, links in bad.items() if links} == {}


def test_the_link_check_finds_a_missing_file_and_heading(tmp_path):
    doc = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title\n\n## The constructions\n")
    doc.write_text("[ok](b.md#the-constructions) [file](c.md) [head](b.md#nowhere) [web](https://x.org/c.md)\n"
                   "```\n[in code](d.md)\n```\n")
    assert list(_broken_links(doc)) == [("c.md", "no such file"), ("b.md#nowhere", "no such heading")]


# ----------------------------------------------------------------------------- the CLI's help


def _help(parser) -> str:
    return " ".join(parser.format_help().split())


def test_the_help_names_every_subcommand_and_when_an_option_applies():
    """The help is documentation too: the top-level description lists every registered
    subcommand (built from the parser, so tune and report are there); report's ``--out``
    and ``--reference`` and scale's ``--curve`` say which option they go with (without it
    they are refused: tests/test_cli.py)."""
    from easyedit_replay.cli import build_parser

    parser = build_parser()
    sub = _subparsers(parser)
    assert {"compare", "scale", "tune", "report", "anchors", "export-model", "stats", "make-corpus"} <= set(sub)
    assert parser.description.endswith("Commands: " + " | ".join(sub))
    assert "Commands: compare | scale | tune | report | anchors |" in _help(parser)
    report = _help(sub["report"])
    assert "--reference REFERENCE only with --points: the point spreading is compared at" in report
    assert ("--out OUT only with --allocation (also write report.md and the two allocation plots into this folder) "
            "or --points / --models (also write the markdown to this file)") in report
    assert "--curve --sequential: evaluate all edits so far after every batch" in _help(sub["scale"])


# ----------------------------------------------------------------------------- lists that must be complete


def test_method_lists_every_registered_construction():
    from easyedit_replay.targets import CONSTRUCTIONS

    method = (DOCS / "method.md").read_text()
    listed = re.findall(r"^\| `([a-z_]+)`", method, flags=re.M)
    assert listed == list(CONSTRUCTIONS)


def test_configuration_names_every_field_and_every_shipped_yaml_model():
    from easyedit_replay.algorithms import RULES

    text = (DOCS / "configuration.md").read_text()
    fields = {f.name for rule in RULES.values() for f in dataclasses.fields(rule.hparams_class)}
    assert sorted(f for f in fields if f"`{f}`" not in text) == []
    models = {p.stem for p in (ROOT / "hparams").glob("*_REPLAY/*.yaml")}
    assert sorted(m for m in models if m not in text) == []


def test_easyedit_only_fields_are_read_nowhere():
    """The fields ``hparams.EASYEDIT_ONLY_FIELDS`` marks as EasyEdit-compatibility only are read
    by no module of the package (``hp.x``, ``hparams.x``, ``getattr(hp, "x")``), and the
    configuration table says so."""
    from easyedit_replay.hparams import EASYEDIT_ONLY_FIELDS

    sources = {p: p.read_text() for p in (ROOT / "easyedit_replay").rglob("*.py") if p.name != "hparams.py"}
    for name in EASYEDIT_ONLY_FIELDS:
        read = re.compile(rf"\b(hp|hparams|hp0|host_hparams)\.{name}\b|getattr\(\w+, [\"']{name}[\"']")
        assert [str(p) for p, text in sources.items() if read.search(text)] == [], name
    assert "hparams.EASYEDIT_ONLY_FIELDS" in (DOCS / "configuration.md").read_text()

