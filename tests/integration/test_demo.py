"""The README's main command, ``qmpnet demo``, run as a user runs it: it must pass and show what the guest saw,
both when driven directly over QMP and when driven over MQTT (its own mosquitto, ``qmpnet serve``, the CLI in
broker mode). One run of the demo serves both tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from qmpnet.testguest import GuestImage

pytestmark = [pytest.mark.integration]

MODELS = (("rtl8139", "8139cp"), ("e1000 ", "e1000"), ("e1000e", "e1000e"), ("virtio-net-pci", "virtio_net"))


@pytest.fixture(scope="module")
def demo(guest_image: GuestImage) -> subprocess.CompletedProcess[str]:
    # guest_image: the image is built (and cached) before the demo looks for it.
    done = subprocess.run([sys.executable, "-m", "qmpnet", "demo"], capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout
    return done


def table(output: str, title: str) -> list[str]:
    """The rows of the table under ``title``."""
    lines = output.splitlines()
    start = lines.index(title) + 2  # the title, then the header
    return lines[start : start + len(MODELS)]


def check_rows(rows: list[str]) -> None:
    for model, driver in MODELS:
        row = next(line for line in rows if line.startswith(model))
        assert driver in row
        assert "10.0.2.15/24" in row
        assert row.rstrip().endswith("ok")


def test_demo_passes_and_reports_each_model(demo: subprocess.CompletedProcess[str]) -> None:
    check_rows(table(demo.stdout, "What the pc guest saw:"))
    assert "guest agent up after" in demo.stderr


def test_demo_drives_the_same_matrix_over_mqtt_and_shows_what_it_sent(demo: subprocess.CompletedProcess[str]) -> None:
    check_rows(table(demo.stdout, "What the pc guest saw over MQTT:"))
    out = demo.stdout
    broker = re.search(r"Over MQTT: mosquitto on (mqtt://127\.0\.0\.1:\d+), qmpnet serve", out)
    assert broker is not None, out
    where = f"--broker {broker.group(1)} --controller demo --guest vm --json"
    for model, _ in MODELS:
        name = model.strip()
        nic_id = f"mqtt{name.split('-')[0]}"
        sent = f"  sent      qmpnet nic add --model {name} --id {nic_id} "
        assert any(line.startswith(sent) and line.endswith(where) for line in out.splitlines()), out
        answers = [line for line in out.splitlines() if line.startswith(f"  answered  {nic_id} {name} ")]
        assert [a.split()[-1] for a in answers] == ["link=up", "link=down", "link=up"], answers
        assert f"  answered  {nic_id}: removed" in out
