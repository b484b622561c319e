"""The house rules: no import cycles, one registration per algorithm and per target
construction (a toy of each added in tests/helpers/toy_extensions.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph)
    return graph


def test_no_import_cycles_in_the_package():
    graph = _import_graph()
    at_import, in_functions, at_call = graph.graph("module"), graph.graph("function"), graph.graph("all")
    assert "easyedit_replay.hparams" in at_import and "easyedit_replay.algorithms" in at_import["easyedit_replay.editor"]
    assert "easyedit_replay.algorithms" not in at_call["easyedit_replay.hparams"]
    # The entry points live below both the package and the host adapter, which import them downward.
    assert "easyedit_replay.entry_points" in at_import["easyedit_replay"]
    assert "easyedit_replay.entry_points" in at_import["easyedit_replay.easyedit"]
    assert "easyedit_replay.easyedit" in in_functions["easyedit_replay"]  # register()
    assert "easyedit_replay" not in at_call["easyedit_replay.easyedit"]
    assert graph.cycles(at_import) == [] and graph.cycles(at_call) == []
    assert graph.main(["--check"]) == 0


def test_import_graph_sees_a_cycle_closed_by_a_lazy_import(tmp_path):
    """``from . import name`` inside a function of a submodule, while the package imports that
    submodule in a function: no cycle at import time, one at call time (issue 17's case)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .leaf import x\n\ndef helper():\n    pass\n\n"
                                     "def register():\n    from .adapter import run\n    return run\n")
    (pkg / "adapter.py").write_text("from . import leaf\n\ndef run():\n    from . import helper\n    return helper\n")
    (pkg / "leaf.py").write_text("x = 1\n")
    graph = _import_graph()
    at_import, at_call = graph.graph("module", root=pkg), graph.graph("all", root=pkg)
    assert at_import == {"pkg": {"pkg.leaf"}, "pkg.adapter": {"pkg.leaf"}, "pkg.leaf": set()}
    assert graph.cycles(at_import) == []
    assert graph.cycles(at_call) == [["pkg", "pkg.adapter"]]


def test_autoload_switch_name_agrees():
    from easyedit_replay import _autoload, easyedit

    assert easyedit.AUTOLOAD_ENV == _autoload.ENV


@pytest.fixture()
def toys():
    from easyedit_replay.algorithms import RULES
    from easyedit_replay.targets import CONSTRUCTIONS

    from .helpers import toy_extensions

    toy_extensions.register()
    yield toy_extensions
    RULES.pop("HalfMEMIT", None)
    CONSTRUCTIONS.pop("ends_divided", None)
    CONSTRUCTIONS.pop("replay_halves", None)


def test_toy_algorithm_and_construction_in_one_file_each(toys, model_tok, stats_dir, templates, demo_records):
    import easyedit_replay
    from easyedit_replay.algorithms import algorithm_names, load_hparams
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.easyedit import plugin_names
    from easyedit_replay.editor import compute_edit

    model, tok = model_tok
    names = algorithm_names()
    assert {"HalfMEMIT_REPLAY", "HalfMEMIT_BLUE", "MEMIT_ENDS_DIVIDED", "HalfMEMIT_ENDS_DIVIDED"} <= set(names)
    assert plugin_names()["HalfMEMIT_ENDS_DIVIDED"] == "HalfMEMIT"
    assert callable(easyedit_replay.apply_halfmemit_ends_divided_to_model)
    hp = load_hparams(default_hparams_path(), alg_name="HalfMEMIT_BLUE", stats_dir=stats_dir, layers=[4, 6],
                      v_num_grad_steps=2)
    assert type(hp).__name__ == "HalfMEMITHyperParams"
    records = demo_records[:1]
    blue = compute_edit(model, tok, records, hp.replace(alg_name="HalfMEMIT_BLUE"), "blue", context_templates=templates)
    memit = compute_edit(model, tok, records, load_hparams(default_hparams_path(), alg_name="MEMIT_BLUE",
                         stats_dir=stats_dir, layers=[4, 6]), "blue", context_templates=templates, anchor=blue.anchors)
    divided = compute_edit(model, tok, records, hp.replace(alg_name="HalfMEMIT_ENDS_DIVIDED"), "ends_divided",
                           context_templates=templates, anchor=blue.anchors)
    first = "model.layers.4.mlp.down_proj.weight"
    torch.testing.assert_close(blue.updates[first], 0.5 * memit.updates[first], rtol=1e-12, atol=0)
    assert [divided.targets.divisor(i) for i in range(2)] == [2.0, 1.0]
    torch.testing.assert_close(divided.updates[first], 0.5 * blue.updates[first], rtol=1e-12, atol=0)


def test_toy_share_is_one_class_and_one_registration(toys, model_tok, stats_dir, templates, demo_records):
    """A new way of sharing the residual (``Halves``: every layer but the last takes half)
    is one Share subclass in one registered construction: every algorithm gets the name
    and its entry point, ``compute_edit`` runs it (its ``prepare`` and ``divisor``), and
    on two edit layers it is bit-identical to ``replay_remaining`` (divisors 2, 1)."""
    import easyedit_replay
    from easyedit_replay.algorithms import algorithm_names, get_algorithm, load_hparams
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.editor import compute_edit

    model, tok = model_tok
    assert {"MEMIT_REPLAY_HALVES", "AlphaEdit_REPLAY_HALVES"} <= set(algorithm_names())
    assert callable(easyedit_replay.apply_memit_replay_halves_to_model)
    hp = load_hparams(default_hparams_path(), alg_name="MEMIT_REPLAY_HALVES", stats_dir=stats_dir, layers=[4, 6],
                      v_num_grad_steps=2)
    halves = get_algorithm(hp.alg_name).construction
    assert halves is toys.REPLAY_HALVES
    plan = compute_edit(model, tok, demo_records[:1], hp, halves, context_templates=templates)
    remaining = compute_edit(model, tok, demo_records[:1], hp, "replay_remaining", context_templates=templates,
                             anchor=plan.anchors)
    assert plan.mode == "replay_halves" and plan.targets.info == {"halves_layers": 2}
    assert [plan.targets.divisor(i) for i in range(2)] == [2.0, 1.0]
    assert plan.updates.keys() == remaining.updates.keys()
    assert all(torch.equal(plan.updates[n], remaining.updates[n]) for n in plan.updates)
