"""The README's main command, ``qmpnet demo``, run as a user runs it: it must pass and show what the guest saw."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from qmpnet.testguest import GuestImage

pytestmark = [pytest.mark.integration]


def test_demo_passes_and_reports_each_model(guest_image: GuestImage) -> None:
    # guest_image: the image is built (and cached) before the demo looks for it.
    done = subprocess.run([sys.executable, "-m", "qmpnet", "demo"], capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout
    for model, driver in (("rtl8139", "8139cp"), ("e1000 ", "e1000"), ("e1000e", "e1000e"),
                          ("virtio-net-pci", "virtio_net")):  # fmt: skip
        row = next(line for line in done.stdout.splitlines() if line.startswith(model))
        assert driver in row
        assert "10.0.2.15/24" in row
        assert row.rstrip().endswith("ok")
    assert "guest agent up after" in done.stderr
