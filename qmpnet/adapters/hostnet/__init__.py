"""Host-side networking: taps on bridges, NAT networks, and checks for direct assignment (VFIO).

This is the adapter between qmpnet and the host's network stack, the way :mod:`qmpnet.adapters.qmp` is the adapter to
QEMU: netlink through pyroute2 (no ``ip`` commands), nftables through ``nft -f -``, DHCP and DNS through
dnsmasq, VFIO through sysfs. pyroute2's and the OS's exceptions do not leave it: callers see qmpnet's error
tree, with fields such as ``nic.backend.bridge`` named.

Every coroutine takes ``netns``: the work is done by a fresh thread inside that network namespace (see
:mod:`qmpnet.adapters.hostnet.netns`), so a controller, or a test, can run guests in a namespace without touching the
host's own links. Nothing here decides *whether* a caller may use a bridge or a network: that is policy, in the
core.

The bridge-mode flow the guest lane runs (docs/host-networking.md has the whole sequence with its undo)::

    tap = await create_tap("br0", queues=n, netns=ns, owner="vm1/virtio0")
    with tap:                                    # closes qmpnet's copies of the fds on exit
        for i, fd in enumerate(tap.fds):         # getfd {"fdname": "<netdev>.fd<i>"}, fd attached (SCM_RIGHTS)
            ...
    netdev_add {"type": "tap", "fd": "<netdev>.fd0" (or "fds": "a:b"), "vhost": vhost_usable()}

The tap is not persistent: once QEMU holds the only fds, ``netdev_del`` (or QEMU exiting) removes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpnet.core.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from qmpnet.adapters.hostnet.nat import Lease, NatStatus, net_down, net_list, net_status, net_up
    from qmpnet.adapters.hostnet.taps import (
        Tap,
        TapInfo,
        check_existing_tap,
        create_tap,
        delete_tap,
        list_taps,
        sweep_taps,
        vhost_usable,
    )
    from qmpnet.adapters.hostnet.vfio import (
        GroupMember,
        Sysfs,
        VfioDevice,
        bind_vfio,
        check_vfio,
        parse_pci_host,
        restore_driver,
    )
    from qmpnet.core.hostconfig import HostnetSettings, NatNetwork, parse_nat_network
    from qmpnet.core.ifnames import (
        IFNAME_MAX,
        TAP_PATTERN_DEFAULT,
        check_ifname,
        check_netns,
        check_tap_pattern,
    )

# The names are loaded on first use (PEP 562), so that importing one module of this package (``host``, which the
# lane gets on every connect) does not load pyroute2 until netlink is needed (docs/performance.md).
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("HostnetSettings", "NatNetwork", "parse_nat_network"), "qmpnet.core.hostconfig"),
    **dict.fromkeys(
        ("Lease", "NatStatus", "net_down", "net_list", "net_status", "net_up"), "qmpnet.adapters.hostnet.nat"
    ),
    **dict.fromkeys(
        ("Tap", "TapInfo", "check_existing_tap", "create_tap", "delete_tap", "list_taps", "sweep_taps",
         "vhost_usable"),
        "qmpnet.adapters.hostnet.taps",
    ),
    **dict.fromkeys(
        ("GroupMember", "Sysfs", "VfioDevice", "bind_vfio", "check_vfio", "parse_pci_host", "restore_driver"),
        "qmpnet.adapters.hostnet.vfio",
    ),
    **dict.fromkeys(
        ("IFNAME_MAX", "TAP_PATTERN_DEFAULT", "check_ifname", "check_netns", "check_tap_pattern"), "qmpnet.core.ifnames"
    ),
}

__all__ = [
    "IFNAME_MAX",
    "TAP_PATTERN_DEFAULT",
    "GroupMember",
    "HostnetSettings",
    "Lease",
    "NatNetwork",
    "NatStatus",
    "Sysfs",
    "Tap",
    "TapInfo",
    "VfioDevice",
    "bind_vfio",
    "check_existing_tap",
    "check_ifname",
    "check_netns",
    "check_tap_pattern",
    "check_vfio",
    "create_tap",
    "delete_tap",
    "list_taps",
    "net_down",
    "net_list",
    "net_status",
    "net_up",
    "parse_nat_network",
    "parse_pci_host",
    "restore_driver",
    "sweep_taps",
    "vhost_usable",
]


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
