"""The state directory every test session gets (never /var/lib/qmpnet), shared by both conftests.

Set in the environment, so that ``qmpnet.connect``, ``Settings()`` and every ``qmpnet`` subprocess of the session
(CLI runs, ``qmpnet serve``) use it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

__all__ = ["state_dir"]


@pytest.fixture(autouse=True, scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state directory of the session's own; subprocesses inherit it through ``QMPNET_STATE_DIR``."""
    path = tmp_path_factory.mktemp("state")
    previous = os.environ.get("QMPNET_STATE_DIR")
    os.environ["QMPNET_STATE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("QMPNET_STATE_DIR", None)
    else:
        os.environ["QMPNET_STATE_DIR"] = previous
