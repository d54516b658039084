"""Shared fixtures of the integration tests: the test guest image, and failure reports that show the guests.

Integration tests boot real QEMU guests (see qmpnet.testguest). When a test fails, every TestMachine among its
fixture values adds a report section with QEMU's command line, its stderr, the console tail and the agent's
last report, so a CI log explains the failure on its own. The session also holds one RabbitMQ node for the MQTT
tests that run on RabbitMQ (see mqtt_fixtures).
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import pytest
from mqtt_fixtures import RabbitMQ, rabbitmq_fixture

from qmpnet.testguest import GuestImage, TestMachine, ensure_image

if TYPE_CHECKING:
    from collections.abc import Generator, Iterable, Iterator


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The test guest's kernel and initramfs, built on first use and cached across sessions."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86 busybox-static)")
    return ensure_image()


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQ]:
    """One RabbitMQ node (MQTT plugin, from Debian's package, no system service) for every MQTT test module."""
    yield from rabbitmq_fixture()


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
