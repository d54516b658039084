"""The integration tests use qmpnet's own pytest plugin (qmpnet/testguest/plugin.py) for guests and failure reports.

The plugin normally loads through its ``pytest11`` entry point (``pip install -e .`` in scripts/setup). A venv
whose install of qmpnet predates the entry point (or ``PYTHONPATH`` pointing at another checkout) does not have
it, so it is registered here when missing. Every session has a state directory of its own (tests/statedir.py).
The session also holds one RabbitMQ node for the MQTT tests that run on
RabbitMQ (see mqtt_fixtures). Figures a test measures but never asserts (failover time, the fleet's convergence)
go through the ``figure`` fixture into a section of the run's summary, so CI's log shows them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import needs
import pytest
from mqtt_fixtures import MODES, Mode, RabbitMQ, rabbitmq_fixture
from statedir import state_dir  # noqa: F401 - a session fixture: pytest finds it here

from qmpnet.testguest import plugin as pytest_plugin

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterator

    from qmpnet.testguest import GuestImage


#: What the tests measured (``figure``), printed at the end of the run.
FIGURES: list[str] = []


@pytest.fixture
def figure() -> Callable[[str], None]:
    """Report a measured figure (never asserted): it is printed in the run's summary."""
    return FIGURES.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("qmpnet figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("qmpnet"):
        config.pluginmanager.register(pytest_plugin, "qmpnet")


@pytest.fixture(scope="session")
def guest_image(qmpnet_guest_image: GuestImage) -> GuestImage:
    """The busybox test guest's kernel and initramfs (the plugin's ``qmpnet_guest_image``)."""
    return qmpnet_guest_image


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQ]:
    """One RabbitMQ node (MQTT plugin, from Debian's package, no system service) for every MQTT test module."""
    yield from rabbitmq_fixture()


@pytest.fixture(scope="module", params=MODES, ids=str)
def mode(request: pytest.FixtureRequest) -> Mode:
    """The broker matrix (``mqtt_fixtures.MODES``): a module whose fixtures ask for ``mode`` runs on each broker.

    A test narrows it with ``@pytest.mark.parametrize("mode", [...], indirect=True)``, or replaces it with a plain
    ``parametrize("mode", ...)``.
    """
    mode: Mode = request.param
    return mode


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test whose host needs are unmet skips, or fails in CI (tests/needs.py)."""
    needs.check_item(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI a skipped test fails, with the skip's reason (tests/needs.py)."""
    return needs.fail_skips_in_ci((yield))

