"""What qmpnet sends the kernel for netem and bridge VLANs is what iproute2 sends, byte for byte (under strace).

The CI kernel has neither netem nor bridge VLAN filtering, so those paths cannot run for real here (the tests that
need them skip, saying why). This module still checks them end to end on any kernel: it runs qmpnet's own host
side (``HostNet.set_shape`` with a delay, the VLAN writer behind ``HostNet.set_vlan``) and the equivalent ``tc``
and ``bridge`` commands under strace, and compares the netlink requests both sent. The kernel may refuse them
(``unsupported``); the request is what is compared. Only the header's sequence number and port id may differ;
netem's 32-bit loss may differ in its last bit (iproute2 rounds, pyroute2 truncates).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import needs
import pytest
from netns_tools import ip, kill_namespace

from qmpnet.adapters.hostnet.shaping import layout_of
from qmpnet.core.model import Shape

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [
    pytest.mark.integration,
    needs.root("create network namespaces"),
    needs.tool("strace", "strace"),
    needs.tool("tc", "iproute2"),
    needs.tool("bridge", "iproute2"),
]

RTM_SETLINK, RTM_DELLINK, RTM_NEWQDISC = 0x13, 0x11, 0x24
_MESSAGE = re.compile(r'nlmsg_type=(0x[0-9a-f]+|RTM_[A-Z]+)[^}]*\}, "((?:\\x[0-9a-f]{2})*)"')
_NAMES = {"RTM_SETLINK": RTM_SETLINK, "RTM_DELLINK": RTM_DELLINK, "RTM_NEWQDISC": RTM_NEWQDISC}
REPO = Path(__file__).parents[2]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"wire-{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "add", "br0", "type", "bridge")
        ip("-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ip("-n", name, "link", "set", "d0", "master", "br0")
        yield name
    finally:
        kill_namespace(name)


def traced(argv: list[str], tmp_path: Path) -> list[tuple[int, bytes]]:
    """Run ``argv`` under strace; the netlink requests it sent as ``(type, payload after the header)``."""
    log = tmp_path / f"trace-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=sendto,sendmsg", "-xx", "-s", "65536", "-o", str(log), *argv],
                   capture_output=True, check=False, env=env)
    found = []
    for kind, payload in _MESSAGE.findall(log.read_text()):
        code = _NAMES.get(kind) if kind.startswith("RTM_") else int(kind, 16)
        if code is not None:
            found.append((code, bytes.fromhex(payload.replace("\\x", ""))))
    return found


def qmpnet_does(netns: str, call: str) -> list[str]:
    """A python command line that runs ``await HostNet(netns).<call>`` and ignores the kernel refusing it."""
    script = (
        "import asyncio\n"
        "from qmpnet.errors import QmpnetError\n"
        "from qmpnet.adapters.hostnet import HostnetSettings\n"
        "from qmpnet.adapters.hostnet.host import HostNet\n"
        "from qmpnet.core.model import Shape, Vlan\n"
        "async def main():\n"
        f"    host = HostNet(HostnetSettings(netns={netns!r}))\n"
        "    try:\n"
        f"        await host.{call}\n"
        "    except QmpnetError as err:\n"
        "        print(err)\n"
        "asyncio.run(main())\n"
    )
    return [sys.executable, "-c", script]


def test_netem_request_is_iproute2s(netns: str, tmp_path: Path) -> None:
    shape = Shape(delay=100_000, jitter=10_000, loss=1.0)
    layout = layout_of(shape, latency=0.05)
    assert layout is not None
    theirs = traced(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", "d0", "root", "handle", "71:",
                     "netem", "delay", "100ms", "10ms", "loss", "1%", "limit", str(layout.netem_limit)], tmp_path)
    ours = traced(qmpnet_does(netns, "set_shape('d0', Shape(delay=100_000, jitter=10_000, loss=1.0))"), tmp_path)
    [(_, iproute2)] = [m for m in theirs if m[0] == RTM_NEWQDISC]
    [(_, qmpnet)] = [m for m in ours if m[0] == RTM_NEWQDISC]
    assert len(qmpnet) == len(iproute2)
    loss_at = iproute2.index(b"netem\0") + 8 + 4 + 8  # TCA_KIND, then TCA_OPTIONS' header, delay and limit
    (theirs_loss,), (our_loss,) = struct.unpack_from("I", iproute2, loss_at), struct.unpack_from("I", qmpnet, loss_at)
    assert abs(theirs_loss - our_loss) <= 1
    assert qmpnet[:loss_at] + qmpnet[loss_at + 4:] == iproute2[:loss_at] + iproute2[loss_at + 4:]


def qmpnet_writes_vlans(netns: str, vlan: str) -> list[str]:
    """A python command line that runs qmpnet's VLAN writer on d0 (below the check that the bridge filters VLANs,
    which on a kernel without VLAN filtering refuses before anything is sent)."""
    script = (
        "from qmpnet.errors import QmpnetError\n"
        "from qmpnet.adapters.hostnet import bridgeports\n"
        "from qmpnet.adapters.hostnet.links import find_link, route\n"
        "from qmpnet.adapters.hostnet.netns import enter_netns\n"
        "from qmpnet.core.model import Vlan\n"
        f"enter_netns({netns!r})\n"
        "with route() as ipr:\n"
        "    try:\n"
        f"        bridgeports.replace_vlans(ipr, find_link(ipr, 'd0'), bridgeports.entries_for({vlan}, 1))\n"
        "    except QmpnetError as err:\n"
        "        print(err)\n"
    )
    return [sys.executable, "-c", script]


@pytest.mark.parametrize(
    ("vlan", "command"),
    [
        ("Vlan(access=10)", ["vlan", "add", "dev", "d0", "vid", "10", "pvid", "untagged"]),
        ("Vlan(trunks=['100-199'])", ["vlan", "add", "dev", "d0", "vid", "100-199"]),
    ],
)
def test_bridge_vlan_requests_are_iproute2s(netns: str, tmp_path: Path, vlan: str, command: list[str]) -> None:
    subprocess.run(["ip", "-n", netns, "link", "set", "br0", "type", "bridge", "vlan_filtering", "1"],
                   capture_output=True, check=False)  # where the kernel can; the requests are compared either way
    theirs = [m for m in traced(["ip", "netns", "exec", netns, "bridge", *command], tmp_path) if m[0] == RTM_SETLINK]
    ours = [m for m in traced(qmpnet_writes_vlans(netns, vlan), tmp_path) if m[0] == RTM_SETLINK]
    assert theirs
    assert ours[: len(theirs)] == theirs
