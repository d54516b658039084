"""tests/needs.py: a test whose host needs are unmet skips with its reason, or fails when ``CI=true``.

Each case runs pytest in a subprocess on a tiny test directory wired like the real conftests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parents[1]

CONFTEST = """
import needs
import pytest

def pytest_runtest_setup(item):
    needs.check_item(item)

@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item):
    return needs.fail_skips_in_ci((yield))

@pytest.fixture
def phoenix():
    pytest.skip("needs a phoenix")  # as a plugin's fixture skips: not through needs
"""

CASES = """
import needs

pytestmark = [needs.need(False, "needs a unicorn")]

def test_marked():
    pass

@needs.tool("no-such-tool-qmpnet", "no-such-package")
def test_tool():
    pass
"""

RUNTIME = """
import needs
import pytest

def test_found_at_run_time():
    needs.require(False, "needs a dragon")

def test_met():
    needs.require(True, "needs nothing")

def test_fixture_skips(phoenix):
    pass

@pytest.mark.xfail(reason="known")
def test_xfail():
    raise AssertionError
"""


def run_pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    needs: host needs\n")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "test_runtime.py").write_text(RUNTIME)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    argv = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "no:asyncio", str(tmp_path)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120, check=False)


def test_outside_ci_unmet_needs_skip_with_their_reason(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, None)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 4 skipped, 1 xfailed" in done.stdout
    reasons = ("needs a unicorn", "needs no-such-tool-qmpnet (apt-get install no-such-package)", "needs a dragon",
               "needs a phoenix")  # fmt: skip
    for reason in reasons:
        assert reason in done.stdout


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_in_ci_unmet_needs_fail(tmp_path: Path, ci: str) -> None:
    done = run_pytest(tmp_path, ci)
    assert done.returncode == 1, done.stdout
    # Markers and fixtures skip in setup (errors in CI), require() in the test body (a failure); xfail stays.
    assert "1 failed, 1 passed, 1 xfailed, 3 errors" in done.stdout
    assert "skipped" not in done.stdout
    assert "needs a phoenix (CI=true: a test whose needs are not met fails instead of skipping)" in done.stdout


def test_ci_false_is_not_ci(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, "false")
    assert done.returncode == 0, done.stdout
    assert "1 passed, 4 skipped, 1 xfailed" in done.stdout
