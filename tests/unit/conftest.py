"""Shared fixtures of the unit suite: a short socket directory, fake QMP monitors, fakes of a controller, settings."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import needs
import pytest
from fakefleet import Fleet, Sink
from fakeqmp import FakeQmp
from hypothesis import settings
from statedir import state_dir  # noqa: F401 - a session fixture: pytest finds it here

from qmpnet.settings import QmpSettings, Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Generator, Iterator

# Deterministic, no example database in the work tree, no per-example deadline (CI machines stall).
settings.register_profile(
    "qmpnet-unit", derandomize=True, database=None, deadline=None, print_blob=True, max_examples=40
)
settings.load_profile("qmpnet-unit")



@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A directory short enough for unix socket paths (pytest's tmp_path can exceed 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="qmpnet-unit-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def fake(sockdir: Path) -> AsyncIterator[FakeQmp]:
    """A fake QMP monitor of a ``pc`` guest (the captured one), listening at ``sockdir/vm1.qmp``."""
    async with FakeQmp(sockdir / "vm1.qmp") as server:
        yield server


@pytest.fixture
def fast() -> Settings:
    """Settings with short timeouts, so the timeout paths run in a fraction of a second."""
    return Settings(
        qmp=QmpSettings(connect_timeout=1.0, command_timeout=0.3, unplug_timeout=0.3, rollback_unplug_timeout=1.0)
    )


@pytest.fixture
def fleet() -> Fleet:
    """Fake QMP connections for a controller's guests (tests/unit/fakefleet.py)."""
    return Fleet()


@pytest.fixture
def sink() -> Sink:
    """A recording state sink for a controller (tests/unit/fakefleet.py)."""
    return Sink()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test whose host needs are unmet skips, or fails in CI (tests/needs.py)."""
    needs.check_item(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI a skipped test fails, with the skip's reason (tests/needs.py)."""
    return needs.fail_skips_in_ci((yield))
