"""The fleet example (contrib/fleet/fleet.py, docs/fleet.md), run as a user runs it: three hosts in network
namespaces with two booted guests each, a three-node RabbitMQ cluster, an orchestrator on ``qmpnet.client``.
It must converge, converge again after a broker node is killed, print both times, and leave nothing behind.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import needs
import pytest
from mqtt_fixtures import need_rabbitmq

if TYPE_CHECKING:
    from collections.abc import Callable

    from qmpnet.testguest import GuestImage

pytestmark = [
    pytest.mark.integration,
    needs.root("create network namespaces and a bridge"),
    needs.tool("ip", "iproute2"),
]

FLEET = Path(__file__).parents[2] / "contrib" / "fleet" / "fleet.py"


def _leftovers(tag: str, work: str) -> list[str]:
    """Whatever the run left: namespaces, links, processes naming its tag or work directory, the directory."""
    found = []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    found += [f"netns {line}" for line in namespaces.splitlines() if tag in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    found += [f"link {line}" for line in links.splitlines() if tag in line]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if work in argv or f"{tag}-h" in argv:
            found.append(f"process {cmdline.parent.name}: {argv}")
    if Path(work).exists():
        found.append(f"directory {work}")
    return found


def test_the_fleet_converges_loses_a_broker_node_converges_again_and_leaves_nothing(
    guest_image: GuestImage, figure: Callable[[str], None]
) -> None:
    # guest_image: the image is built (and cached) before the example looks for it.
    need_rabbitmq()
    done = subprocess.run([sys.executable, str(FLEET), "--timeout", "120"], capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith(("converged", "killed", "up:")):
            figure(f"fleet example: {line}")  # the example's timings, printed in the run's summary
    assert done.returncode == 0, done.stdout + done.stderr
    started = re.search(r"^fleet (qf[0-9a-f]+): work directory (\S+),", done.stdout, re.MULTILINE)
    assert started is not None, done.stdout
    assert re.search(r"^converged: 6 guests to generation 1 in [0-9.]+ s$", done.stdout, re.MULTILINE)
    assert re.search(r"^converged again: generation 2 in [0-9.]+ s after", done.stdout, re.MULTILINE)
    assert "checked: every guest's QEMU has exactly its desired NICs" in done.stdout
    assert _leftovers(started.group(1), started.group(2)) == []
