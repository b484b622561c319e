"""Shared fixtures: the real SmolLM2 model, the bundled hyperparameters, ../shared data, the
half-precision plan (:mod:`tests.half_precision`); the per-test time limit's note."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .half_precision import HalfPlan, half_choice, measure_rates
from .time_limit import pytest_runtest_makereport  # noqa: F401  (a hook)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EASYEDIT_REPLAY_SHARED", ROOT.parent / "shared"))
SHARED_DATA = SHARED / "data"


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are files, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results_section(heading: str, ends=("\n## ",)) -> str:
    """docs/results.md from the line ``heading`` (a markdown heading, without its leading
    newline) up to the first of ``ends`` after it, or to the end of the page when none
    follows; raises ValueError when the heading is missing."""
    results = (ROOT / "docs" / "results.md").read_text()
    start = results.index("\n" + heading)
    stops = [results.find(end, start + 1) for end in ends]
    return results[start:min([stop for stop in stops if stop >= 0], default=len(results))]


requires_shared = pytest.mark.skipif(
    not SHARED_DATA.exists(), reason=f"../shared/data is absent ({SHARED_DATA}); it exists in CI and in the team's checkouts"
)


@pytest.fixture(scope="session")
def model_tok():
    """SmolLM2-135M-Instruct on CPU, float32 (converted once into the cache)."""
    from easyedit_replay.models import load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = load_model("smollm2-135m")
    return model, tok


@pytest.fixture(scope="session")
def stats_dir():
    from easyedit_replay.paths import cache_root

    return str(cache_root() / "stats")


@pytest.fixture()
def hparams(stats_dir):
    """The bundled MEMIT_REPLAY YAML for SmolLM2 with a short anchor optimization."""
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.algorithms import load_hparams

    return load_hparams(default_hparams_path(), stats_dir=stats_dir)


@pytest.fixture(scope="session")
def templates():
    """Fixed context templates (injected), so tests do not depend on sampling."""
    return [["{}"], ["The following is true. {}", "I read this yesterday. {}"]]


@pytest.fixture(scope="session")
def demo_records():
    from easyedit_replay.data import load_records

    return load_records()


@pytest.fixture(scope="session", autouse=True)
def private_anchor_cache(tmp_path_factory):
    """Every test run gets its own, initially empty anchor cache (so no test depends on
    anchors left by an earlier run); tests that inspect the cache set their own."""
    old = os.environ.get("EASYEDIT_REPLAY_ANCHOR_CACHE")
    os.environ["EASYEDIT_REPLAY_ANCHOR_CACHE"] = str(tmp_path_factory.mktemp("anchors"))
    yield
    if old is None:
        os.environ.pop("EASYEDIT_REPLAY_ANCHOR_CACHE", None)
    else:
        os.environ["EASYEDIT_REPLAY_ANCHOR_CACHE"] = old


_HALF_PLANS = []


@pytest.fixture(scope="session")
def half_plan() -> HalfPlan:
    """The measured half-precision matmul rates and the path of the end-to-end half tests
    (:class:`tests.half_precision.HalfPlan`); printed in the terminal summary."""
    plan = HalfPlan(measure_rates(), half_choice())
    _HALF_PLANS.append(plan)
    return plan


def pytest_terminal_summary(terminalreporter):
    """The half-precision path and its measured rates, when a test used :func:`half_plan`."""
    for plan in _HALF_PLANS:
        terminalreporter.write_sep("-", "half-precision tests")
        for name in ("bfloat16", "float16"):
            terminalreporter.write_line(plan.reason(name))
