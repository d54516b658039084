"""The pytest plugin as a user meets it: docs/testing.md's example files in a fresh project, run by ``pytest``.

The project has no conftest.py and does not mention qmpnet's plugin, so its fixtures resolve only if the plugin
loads through its ``pytest11`` entry point, as in any environment where qmpnet is installed. A deliberately
failing test next to the example shows the failure report the plugin adds (the guest's command line and console).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DOC = Path(__file__).parents[2] / "docs" / "testing.md"
#: A fenced block whose info string names a file: ```python test_network.py, ```ini pytest.ini
_FILE_BLOCK = re.compile(r"^```(?:python|ini) (?P<name>[\w.]+)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)
FAILING = """
import pytest


@pytest.mark.asyncio
async def test_fails_on_purpose(qmpnet_guest):
    assert await qmpnet_guest.shell("echo hello") == "bye"
"""


def example_files() -> dict[str, str]:
    files = {match["name"]: match["body"] for match in _FILE_BLOCK.finditer(DOC.read_text())}
    assert any(name.startswith("test_") for name in files), f"no ```python test_*.py blocks in {DOC}"
    return files


def test_the_plugin_is_installed_through_its_entry_point() -> None:
    found = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "qmpnet"]
    assert [ep.value for ep in found] == ["qmpnet.testguest.plugin"], (
        "qmpnet is installed without its pytest11 entry point: reinstall it (./scripts/setup runs pip install -e .)"
    )


def test_the_documented_example_runs_as_written(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    files = example_files()
    for name, body in files.items():
        (project / name).write_text(body)
    (project / "test_failing.py").write_text(FAILING)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output  # the one test that fails on purpose
    assert re.search(r"\b1 failed, 3 passed\b", output), output
    for name in files:
        if name.startswith("test_"):
            assert f"PASSED {name}::" in output, output
    assert "warning" not in output.lower(), output
    # The plugin's failure report: which guest, with its QEMU command line and console.
    assert "test machine busybox-pc" in output, output
    assert "command line: qemu-system-x86_64" in output, output
