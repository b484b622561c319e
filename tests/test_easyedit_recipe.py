"""examples/easyedit/: the recipe script's checks before it installs anything, the edits
it writes for ``run_AlphaEdit_editing.py``, the offline Punkt model, and the table.

None of these needs EasyEdit or a network; the recipe itself (venv, installs, edits)
is run by hand (docs/easyedit.md records a run).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

EXAMPLES = ROOT / "examples" / "easyedit"


def _script(*args, cwd=None):
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=60)


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def fake_easyedit(tmp_path) -> Path:
    """The three files run_recipe.sh checks for, and nothing else."""
    root = tmp_path / "EasyEdit"
    for rel in ("easyeditor/__init__.py", "examples/run_AlphaEdit_editing.py", "requirements.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    return root


def test_recipe_usage_and_wrong_folder(tmp_path):
    usage = _script(EXAMPLES / "run_recipe.sh")
    assert usage.returncode == 2 and "EASYEDIT_DIR" in usage.stdout and "--offline" in usage.stdout
    missing = _script(EXAMPLES / "run_recipe.sh", tmp_path / "nowhere")
    assert missing.returncode == 1 and "git clone https://github.com/zjunlp/EasyEdit.git" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = _script(EXAMPLES / "run_recipe.sh", tmp_path / "empty")
    assert empty.returncode == 1 and "is not an EasyEdit checkout" in empty.stderr


def test_recipe_refuses_bad_options_before_installing(fake_easyedit, tmp_path):
    work = tmp_path / "work"
    alg = _script(EXAMPLES / "run_recipe.sh", fake_easyedit, "--algs", "MEMIT,ROME_REPLAY", "--work", work)
    assert alg.returncode == 1 and "no hparams/ROME_REPLAY/smollm2-135m.yaml" in alg.stderr
    assert "MEMIT_REPLAY" in alg.stderr  # the message lists what exists
    edits = _script(EXAMPLES / "run_recipe.sh", fake_easyedit, "--edits", "0", "--work", work)
    assert edits.returncode == 1 and "--edits must be a positive number" in edits.stderr
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "times.tsv").write_text("MEMIT\t4\t1.0\t0\n")
    reused = _script(EXAMPLES / "run_recipe.sh", fake_easyedit, "--out", tmp_path / "old", "--work", work)
    assert reused.returncode == 1 and "already holds a run; pass a new --out" in reused.stderr
    unknown = _script(EXAMPLES / "run_recipe.sh", fake_easyedit, "--fast")
    assert unknown.returncode == 1 and "unknown option --fast" in unknown.stderr
    assert not (work / "venv").exists()


def test_side_by_side_needs_a_yaml_per_run(fake_easyedit, tmp_path):
    (tmp_path / "work" / "yaml").mkdir(parents=True)
    proc = _script(EXAMPLES / "side_by_side.sh", fake_easyedit, tmp_path / "work", tmp_path / "out", "MEMIT:4")
    assert proc.returncode == 2 and "yaml/MEMIT.yaml" in proc.stderr
    assert not (tmp_path / "out" / "times.tsv").exists()


def test_make_counterfact_writes_what_run_alphaedit_editing_reads(tmp_path):
    """The CF layout: the prompt with ``{}`` for the subject (the script formats it back),
    target_new/target_true as ``{"str": ...}``, one paraphrase and neighbourhood prompt."""
    make = _module("make_counterfact")
    records = [
        {"case_id": 7, "prompt": "BBC One is owned by", "subject": "BBC One", "target_new": "Sega",
         "ground_truth": "BBC", "rephrase_prompt": "The owner of BBC One is", "locality_prompt": "BBC Two is owned by"},
        {"case_id": 8, "prompt": "Who owns it?", "subject": "Nowhere", "target_new": "x", "ground_truth": "y",
         "rephrase_prompt": "r", "locality_prompt": "l"},
    ]
    src = tmp_path / "cf.json"
    src.write_text(json.dumps(records))
    assert make.main([str(tmp_path / "cf"), "--data", str(src)]) == 0
    out = json.loads((tmp_path / "cf" / "counterfact.json").read_text())
    assert len(out) == 1  # the record whose prompt lacks its subject is skipped
    rw = out[0]["requested_rewrite"]
    assert rw["prompt"].format(rw["subject"]) == "BBC One is owned by" and rw["prompt"] == "{} is owned by"
    assert rw["target_new"] == {"str": "Sega"} and rw["target_true"] == {"str": "BBC"}
    assert out[0]["paraphrase_prompts"] == ["The owner of BBC One is"]
    assert out[0]["neighborhood_prompts"] == ["BBC Two is owned by"] and out[0]["case_id"] == 7
    # the default is the bundled demo edits
    assert make.main([str(tmp_path / "demo"), "--n", "3"]) == 0
    assert len(json.loads((tmp_path / "demo" / "counterfact.json").read_text())) == 3
    src.write_text(json.dumps([{"prompt": "p", "subject": "s"}]))
    with pytest.raises(SystemExit, match="records lack"):
        make.main([str(tmp_path / "bad"), "--data", str(src)])


def test_offline_punkt_serves_word_tokenize(tmp_path):
    nltk = pytest.importorskip("nltk", reason="nltk is one of EasyEdit's requirements, not the plugin's")
    nltk_dir = _module("offline_punkt").write_untrained_punkt(str(tmp_path / "nltk_data"))
    code = f"import nltk; nltk.data.path[:] = [{nltk_dir!r}]; print(nltk.word_tokenize('It works. Yes.'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "works" in proc.stdout and nltk.__version__


def test_table_rows_from_a_run(tmp_path):
    """One row per line of times.tsv: the means of the script's results JSON, or the failure."""
    out = tmp_path / "out"
    (out / "MEMIT").mkdir(parents=True)
    post = [{"rewrite_acc": [1.0], "rephrase_acc": [0.0], "locality": {"neighborhood_acc": [1.0]},
             "fluency": {"ngram_entropy": 6.0}},
            {"rewrite_acc": [0.5], "rephrase_acc": [1.0], "locality": {"neighborhood_acc": [0.5]},
             "fluency": {"ngram_entropy": 5.0}}]
    (out / "MEMIT" / "m.json").write_text(json.dumps([{"pre": {"rewrite_acc": [0.0]}, "post": p} for p in post]))
    (out / "times.tsv").write_text("MEMIT\t2\t61.4\t0\nPMET\t2\t12.0\t1\n")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "table.py"), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[2] == "| MEMIT | 2 | 0.75 | 0.50 | 0.75 | 5.50 | 0.00 | 61 |"
    assert lines[3].startswith("| PMET | 2 | run failed (exit code 1, see PMET.log)")
