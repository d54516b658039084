"""Chaos (marker ``chaos``): QEMU and the controller killed with SIGKILL, ten times each; see chaos_scenarios.py.

``QMPNET_CHAOS_ROUNDS`` changes the number of rounds; bench/chaos.py runs the same scenarios and prints figures.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
from chaos_scenarios import controller_kills, qemu_restarts

if TYPE_CHECKING:
    from pathlib import Path

    from qmpnet.testguest import GuestImage

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

ROUNDS = int(os.environ.get("QMPNET_CHAOS_ROUNDS", "10"))


async def test_qemu_killed_and_restarted_gets_its_desired_nics_back(guest_image: GuestImage, tmp_path: Path) -> None:
    result = await qemu_restarts(guest_image, tmp_path, ROUNDS)
    assert len(result.convergence) == ROUNDS
    print(f"\nQEMU kill -9 x{ROUNDS}: desired NICs back in the guest: {result.summary()}")  # noqa: T201


async def test_controller_killed_mid_burst_converges_without_applying_twice(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    result = await controller_kills(guest_image, tmp_path, ROUNDS)
    assert len(result.convergence) == ROUNDS
    print(f"\ncontroller kill -9 x{ROUNDS}: converged after restart: {result.summary()}")  # noqa: T201
