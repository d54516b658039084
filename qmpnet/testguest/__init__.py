"""The qmpnet test guest: a tiny Linux guest, its in-guest agent, and an async harness that boots it.

Integration tests use it to see what a real guest sees of the NICs that qmpnet plugs in::

    image = ensure_image()
    async with TestMachine(image, machine="q35", root_ports=2) as vm:
        nic = await vm.agent.wait_for(lambda interfaces: find_mac(interfaces, mac), timeout=10)

:mod:`.build` makes and caches the kernel and initramfs, :mod:`.machine` runs QEMU, and :mod:`.agent` talks to
the in-guest agent (`init.sh`) over the guest's second serial port. :mod:`.debian` builds the Debian 12 guest
(systemd, udev, networkd, qemu-guest-agent: ``TestMachine(image, flavour="debian")``). :mod:`.services` and
:mod:`.probe` run mosquitto and ``qmpnet serve`` for MQTT tests, and :mod:`.plugin` is the pytest plugin that
puts all of it into any test suite. This package is test tooling: nothing in the rest of qmpnet imports it but
``qmpnet demo``; this ``__init__`` does not import the plugin.
"""

from .agent import (
    Agent,
    AgentError,
    AgentTimeoutError,
    GuestInterface,
    InterfacesReport,
    RunResult,
    find_mac,
)
from .build import BuildError, GuestImage, default_cache_dir, ensure_image
from .debian import DebianImage, ensure_debian_image
from .machine import BRIDGE_ID, BRIDGE_PORT_ID, FLAVOURS, Flavour, MachineError, TestMachine, detect_accel

__all__ = [
    "BRIDGE_ID",
    "BRIDGE_PORT_ID",
    "FLAVOURS",
    "Agent",
    "AgentError",
    "AgentTimeoutError",
    "BuildError",
    "DebianImage",
    "Flavour",
    "GuestImage",
    "GuestInterface",
    "InterfacesReport",
    "MachineError",
    "RunResult",
    "TestMachine",
    "default_cache_dir",
    "detect_accel",
    "ensure_debian_image",
    "ensure_image",
    "find_mac",
]
