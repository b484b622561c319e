"""``patches/easyedit-memit-fe-padding.diff``: EasyEdit's MEMIT-FE run right-padded by
``BaseEditor``, and its llama3.2-3b YAML loadable (docs/easyedit.md, "patches/").

The hermetic test checks that the diff stays minimal. The host tests need
``EASYEDIT_ROOT`` (a checkout with ``easyeditor/models/memit_FE``) and an interpreter
with EasyEdit's requirements (``EASYEDIT_PYTHON``, default this one); they apply the
patch to a scratch copy of ``EASYEDIT_ROOT`` and run ``tests/helpers/easyedit_fe_editor.py``
against the copy and against the unpatched checkout; they skip otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from easyedit_replay.editor import compute_edit

from .conftest import ROOT
from .helpers.easyedit_host import host_inputs, relative_differences
from .test_core import with_fields

PATCH = ROOT / "patches" / "easyedit-memit-fe-padding.diff"
STUBS = ROOT / "examples" / "easyedit" / "host_stubs"
CHILD = Path(__file__).resolve().parent / "helpers" / "easyedit_fe_editor.py"
EASYEDIT_ROOT = os.environ.get("EASYEDIT_ROOT")
requires_fe = pytest.mark.skipif(
    not EASYEDIT_ROOT or not Path(EASYEDIT_ROOT, "easyeditor", "models", "memit_FE").is_dir(),
    reason="set EASYEDIT_ROOT to an EasyEdit checkout with MEMIT-FE (and EASYEDIT_PYTHON to its interpreter)")
# Same bound as tests/test_memit_fe.py (measured there with execute_memit called directly:
# 2.6e-6 to 6.6e-6 per layer), here on the difference per layer relative to the edit's
# largest layer update: one edit's own update can shrink a hundredfold from l_1 to l_n
# (the earlier layers already reach the later targets), and float rounding relative to a
# near-zero layer update is no longer small (docs/easyedit.md, "patches/").
PARITY_TOLERANCE = 1e-4


def scaled_differences(ours: dict, theirs: dict) -> dict:
    """``{weight name: |ours - theirs| / max over layers |theirs|}`` (Frobenius, float64)."""
    scale = max(float(t.double().norm()) for t in theirs.values())
    return {k: float((ours[k].double() - theirs[k].double()).norm()) / scale for k in theirs}


def _changed_lines(diff: str) -> dict:
    """``{file: ([removed lines], [added lines])}`` of a unified diff."""
    files, current = {}, None
    for line in diff.splitlines():
        if line.startswith("+++ b/"):
            current = files.setdefault(line[6:], ([], []))
        elif current is not None and line.startswith("-") and not line.startswith("---"):
            current[0].append(line[1:])
        elif current is not None and line.startswith("+"):
            current[1].append(line[1:])
    return files


def test_padding_patch_is_minimal():
    """Two files; in editor.py, the two alg_name lists gain 'MEMIT-FE' and nothing else
    changes; in the YAML, only alg_name becomes "MEMIT-FE"."""
    files = _changed_lines(PATCH.read_text())
    assert sorted(files) == ["easyeditor/editors/editor.py", "hparams/MEMIT-FE/llama3.2-3b.yaml"]
    removed, added = files["easyeditor/editors/editor.py"]
    assert len(removed) == len(added) == 2
    for old, new in zip(removed, added):
        assert "'MEMIT-FE'" not in old and new == old.replace("'MEMIT', ", "'MEMIT', 'MEMIT-FE', ", 1) != old
    assert files["hparams/MEMIT-FE/llama3.2-3b.yaml"] == (['alg_name: "MEMIT"'], ['alg_name: "MEMIT-FE"'])


def _run_child(root: Path, inputs: Path, report: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(EASYEDIT_ROOT=str(root), PYTHONPATH=os.pathsep.join([str(ROOT), str(STUBS)]),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([os.environ.get("EASYEDIT_PYTHON", sys.executable), str(CHILD), str(inputs), str(report)],
                          capture_output=True, text=True, env=env, cwd=report.parent, timeout=1800)
    if proc.returncode != 0 and re.search(r"No module named '(?!easyedit)", proc.stderr):
        pytest.skip(f"EasyEdit does not import with {env.get('EASYEDIT_PYTHON', sys.executable)}: "
                    f"{proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(report, weights_only=False)


@pytest.fixture(scope="module")
def patched_root(tmp_path_factory) -> Path:
    """A scratch copy of EASYEDIT_ROOT's ``easyeditor/`` and ``hparams/`` with the patch applied."""
    copy = tmp_path_factory.mktemp("easyedit_patched")
    for sub in ("easyeditor", "hparams"):
        shutil.copytree(Path(EASYEDIT_ROOT, sub), copy / sub, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(["git", "apply", str(PATCH)], cwd=copy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return copy


@pytest.mark.slow
@requires_fe
def test_patched_memit_fe_through_base_editor_equals_replay(patched_root, model_tok, hparams, templates,
                                                            demo_records, stats_dir, tmp_path):
    """Unpatched, BaseEditor leaves MEMIT-FE left-padded and its update is another one;
    patched, it pads right and each request's update equals MEMIT_REPLAY's (difference per
    layer < 1e-4 of the edit's largest layer update); every MEMIT-FE YAML loads. Two demo
    edits, each from the unedited weights, 6 anchor steps, the same templates and
    statistics on both sides."""
    hp = with_fields(hparams, v_num_grad_steps=6)
    records = [{k: r[k] for k in ("prompt", "subject", "target_new", "ground_truth")} for r in demo_records[:2]]
    ours = [compute_edit(*model_tok, [r], hp, "replay", context_templates=templates, stats_dir=stats_dir).updates
            for r in records]
    modules = [hp.rewrite_module_tmp.format(l) for l in hp.layers]
    inputs = tmp_path / "inputs.pt"
    torch.save(host_inputs(model_tok, hp, records, templates, modules, stats_dir), inputs)
    (tmp_path / "patched").mkdir()
    (tmp_path / "stock").mkdir()
    patched = _run_child(patched_root, inputs, tmp_path / "patched" / "report.pt")
    stock = _run_child(Path(EASYEDIT_ROOT), inputs, tmp_path / "stock" / "report.pt")

    scaled = [scaled_differences(o, p) for o, p in zip(ours, patched["updates"])]
    rel = [relative_differences(o, p) for o, p in zip(ours, patched["updates"])]
    rel_stock = [relative_differences(o, s) for o, s in zip(ours, stock["updates"])]

    def show(label, rows):
        print(f"{label}:", [{k.split(".")[2]: f"{v:.2e}" for k, v in r.items()} for r in rows])

    show("MEMIT_REPLAY vs patched MEMIT-FE through BaseEditor, |ours - FE| / max |FE|", scaled)
    show("same, |ours - FE| / |FE| per layer", rel)
    show("patched MEMIT-FE update norm per layer", [{k: float(v.norm()) for k, v in u.items()}
                                                    for u in patched["updates"]])
    show("MEMIT_REPLAY vs unpatched MEMIT-FE through BaseEditor, |ours - FE| / |FE| per layer", rel_stock)
    print("rewrite_acc pre/post, patched:", patched["pre"], patched["post"], "unpatched:", stock["pre"], stock["post"])

    assert stock["padding_side"] == "left" and patched["padding_side"] == "right"
    assert all(post[0] > pre[0] for pre, post in zip(patched["pre"], patched["post"])), patched  # it edits
    assert len(patched["updates"]) == len(records) and all(len(r) == len(hp.layers) for r in scaled)
    assert max(max(r.values()) for r in scaled) < PARITY_TOLERANCE, scaled
    assert min(min(r.values()) for r in rel_stock) > 0.1, rel_stock  # the tolerance tells the two apart
    bad = {k: v for k, v in stock["yaml"].items() if v != "MEMIT-FE"}
    assert list(bad) == ["llama3.2-3b.yaml"] and "AssertionError" in bad["llama3.2-3b.yaml"], bad
    assert set(patched["yaml"].values()) == {"MEMIT-FE"} and len(patched["yaml"]) >= 12, patched["yaml"]
