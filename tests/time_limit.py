"""The per-test time limit's failure note (``pytest-timeout``; the limit is ``timeout`` in
setup.cfg's ``[tool:pytest]``). Used as a hook by ``tests/conftest.py``."""

from __future__ import annotations

import pytest

from .half_precision import ENV_VAR

NOTE = ("The test ran past the per-test limit ({message}); the limit is `timeout` in setup.cfg's "
        "[tool:pytest] (or --timeout=SECONDS). On a CPU without native bf16/fp16 matrix units the "
        f"half-precision tests should take the reduced path by themselves; {ENV_VAR}=reduced forces it.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Append :data:`NOTE` to the report of a test that ``pytest-timeout`` stopped."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and "from pytest-timeout" in str(call.excinfo.value):
        report.sections.append(("per-test time limit", NOTE.format(message=str(call.excinfo.value).strip())))
