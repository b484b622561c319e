"""The per-test time limit (pytest-timeout, ``[tool:pytest]`` in setup.cfg): configured, and
a test that runs past it fails with the note of ``tests/time_limit.py`` while the suite goes on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_per_test_limit_is_configured(pytestconfig):
    assert float(pytestconfig.getini("timeout")) == 600
    assert pytestconfig.getini("timeout_method") == "signal"


def test_a_test_past_the_limit_fails_with_a_note_and_the_suite_goes_on(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.time_limit import pytest_runtest_makereport  # noqa: F401\n")
    (tmp_path / "test_sleep.py").write_text(textwrap.dedent("""
        import time

        def test_sleeps():
            time.sleep(30)

        def test_after():
            assert True
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=1",
                           "-o", "timeout_method=signal", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 failed, 1 passed" in out, out
    assert "Timeout (>1.0s) from pytest-timeout." in out, out
    assert "per-test time limit" in out and "`timeout` in setup.cfg's [tool:pytest]" in out, out
    assert "EASYEDIT_REPLAY_TEST_HALF=reduced" in out, out
