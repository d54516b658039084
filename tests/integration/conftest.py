"""Shared fixtures of the integration tests: the test guest image, and failure reports that show the guests.

Integration tests boot real QEMU guests (see qmpnet.testguest). When a test fails, every TestMachine among its
fixture values adds a report section with QEMU's command line, its stderr, the console tail and the agent's
last report, so a CI log explains the failure on its own.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

import pytest

from qmpnet.testguest import GuestImage, TestMachine, ensure_image

if TYPE_CHECKING:
    from collections.abc import Generator, Iterable, Iterator
    from pathlib import Path


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The test guest's kernel and initramfs, built on first use and cached across sessions."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86 busybox-static)")
    return ensure_image()


@pytest.fixture(autouse=True, scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state directory of the session's own (never /var/lib/qmpnet); subprocesses inherit it."""
    path = tmp_path_factory.mktemp("state")
    previous = os.environ.get("QMPNET_STATE_DIR")
    os.environ["QMPNET_STATE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("QMPNET_STATE_DIR", None)
    else:
        os.environ["QMPNET_STATE_DIR"] = previous


def _machines(values: Iterable[object]) -> Iterator[TestMachine]:
    """The TestMachines among fixture values, directly or one level inside a list, tuple or dict."""
    for value in values:
        members = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else [value]
        yield from (member for member in members if isinstance(member, TestMachine))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Describe the test machines a failed test used."""
    report = yield
    if report.failed and isinstance(item, pytest.Function):
        for machine in _machines(item.funcargs.values()):
            report.sections.append((f"test machine {machine.name}", machine.describe()))
    return report
