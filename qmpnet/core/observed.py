"""What a guest has and what happens to it: a NIC as it is now, as its guest sees it, events and results."""

# Without `from __future__ import annotations`: pydantic would compile each field's annotation from its string,
# ~70 k instructions a field in every new process (docs/performance.md).

import ipaddress
from typing import Literal

from pydantic import Field

from qmpnet.core.model_base import BUILT_ON_FIRST_USE, Frozen, LinkState, Mac, NicState, empty_list


class PciAddress(Frozen):
    """Where a device sits: the bus id (``pci.0``, ``pcie.0`` or a bridge/root-port id), slot and function."""

    bus: str
    slot: int
    function: int


class ObservedBackend(Frozen):
    """A backend as QEMU describes it (HMP ``info network``): its type and its option string."""

    type: str
    options: dict[str, str] = Field(default_factory=dict)


class RxFilter(Frozen):
    """The receive filter state a virtio-net guest driver programmed (``query-rx-filter``)."""

    promiscuous: bool
    multicast: str
    unicast: str
    main_mac: str
    multicast_table: list[str]
    unicast_table: list[str]


class GuestView(Frozen):
    """A NIC as the guest OS sees it, read through its guest agent (qemu-guest-agent)."""

    model_config = BUILT_ON_FIRST_USE

    ifname: str = Field(description="The guest's interface name, e.g. ens4 or enp1s0 (udev's predictable names).")
    mac: Mac = Field(description="The interface's MAC address, as the guest reports it.")
    carrier: bool | None = Field(
        default=None, description="/sys/class/net/<if>/carrier; null when unreadable (the interface is down)."
    )
    operstate: str | None = Field(
        default=None, description="/sys/class/net/<if>/operstate (up, down, lowerlayerdown, ...); null if unreadable."
    )
    addresses: list[str] = Field(
        default_factory=empty_list, description="The interface's addresses with prefix length, e.g. 10.0.2.15/24."
    )

    def has_address(self) -> bool:
        """Whether the interface has an address other than a link-local one (fe80::/10, 169.254.0.0/16)."""
        for entry in self.addresses:
            address = ipaddress.ip_interface(entry).ip
            if not (address.is_link_local or address.is_loopback):
                return True
        return False


class Nic(Frozen):
    """A NIC as it is in the guest now."""

    id: str
    model: str
    mac: str | None
    netdev: str | None
    backend: ObservedBackend | None
    pci: PciAddress | None
    link: LinkState
    state: NicState
    rx_filter: RxFilter | None = None
    managed: bool = Field(
        default=False, description="qmpnet created this NIC (so `apply --prune` may remove it); false for others."
    )
    guest: GuestView | None = Field(
        default=None, description="The guest's own view of this NIC (from its guest agent); null when none answers."
    )
    pending_since: float | None = Field(
        default=None,
        description="removal_pending: when QEMU accepted the unplug request (Unix time, kept in the state store, so "
        "it survives restarts); null otherwise.",
    )
    warnings: list[str] = Field(
        default_factory=empty_list,
        description="In the answer of nic/add and nic/update: what the caller must do itself, e.g. set the MTU in "
        "the guest when the device cannot carry it (e1000, e1000e, rtl8139; a live MTU change). Empty elsewhere.",
    )


class RemoveResult(Frozen):
    """The outcome of a removal: ``removed``, or ``removal_pending`` while the guest has not acked."""

    model_config = BUILT_ON_FIRST_USE

    id: str
    state: Literal["removed", "removal_pending"]


class ModelInfo(Frozen):
    """A NIC model this QEMU offers (the old ``-net nic,model=?``)."""

    model_config = BUILT_ON_FIRST_USE

    name: str
    bus: Literal["pci", "pcie", "other"]
    speed: str | None
    description: str
    hotplug: bool = Field(description="qmpnet can hot-add this model.")


GuestEventName = Literal[
    "nic_added",
    "nic_removed",
    "nic_removal_pending",
    "unplug_rejected",
    "link_changed",
    "nic_updated",
    "rx_filter_changed",
    "guest_connected",
    "guest_disconnected",
    "reconciled",
    "drift",
    "record_discarded",
    "unplug_stuck",
]


class DiscardedRecord(Frozen):
    """A record of the state store that could not be read, moved aside; the guest was rebuilt from QEMU."""

    model_config = BUILT_ON_FIRST_USE

    file: str = Field(description="Where the record was.")
    moved_to: str = Field(description="Where it is now (`<name>.corrupt-<timestamp>`): nothing is deleted.")
    reason: str = Field(description="Why it could not be read (not JSON, another format version, invalid).")


class GuestEvent(Frozen):
    """Something that happened to a guest's network (published as ``.../event/<name>`` over MQTT)."""

    model_config = BUILT_ON_FIRST_USE

    name: GuestEventName
    ts: float
    guest: str
    id: str | None = None
    nic: Nic | None = None
    message: str | None = Field(
        default=None, description="For the operator: what happened and what can be done (unplug_stuck)."
    )


def check_file_path(value: str) -> str:
    """An absolute path without ``..`` or NUL (a capture file QEMU will create)."""
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    if "\x00" in value or "/../" in f"{value}/" or value.endswith("/"):
        raise ValueError("must name a file, without '..' or NUL")
    return value


class CaptureResult(Frozen):
    """A NIC's live capture (QEMU ``filter-dump`` into a pcap file) after ``start`` or ``stop``."""

    model_config = BUILT_ON_FIRST_USE

    id: str = Field(description="The NIC's id.")
    state: Literal["capturing", "stopped"] = Field(description="Whether QEMU is writing the file now.")
    file: str | None = Field(default=None, description="The pcap file.")


class BusCapacity(Frozen):
    """One bus a model's hot-add may go to, and how many of its places are free."""

    model_config = BUILT_ON_FIRST_USE

    bus: str = Field(description="The bus id (``pci.0``, or the id of the root port or bridge providing it).")
    kind: Literal["root", "root_port", "pci_bridge"] = Field(
        description="root: pci.0 (pc); root_port: a pcie-root-port (one device); pci_bridge: a pci-bridge or "
        "pcie-pci-bridge (slots 1-31)."
    )
    free: int = Field(ge=0, description="Free places on this bus.")


class ModelCapacity(Frozen):
    """How many more NICs of one model can be hot-plugged now, and where (the places automatic placement uses)."""

    model_config = BUILT_ON_FIRST_USE

    model: str = Field(description="The device model, e.g. virtio-net-pci.")
    free: int = Field(ge=0, description="How many more NICs of this model can be hot-plugged now.")
    root_ports: int = Field(ge=0, description="Of these, free pcie-root-ports (q35).")
    bridge_slots: int = Field(ge=0, description="Of these, free slots on pci-bridges and pcie-pci-bridges (q35).")
    root_slots: int = Field(ge=0, description="Of these, free slots of pci.0 (pc).")
    buses: list[BusCapacity] = Field(description="Every bus this model's automatic placement uses, in its order.")
    advice: str | None = Field(
        default=None, description="When none is free: what to add to the QEMU command line (as in no_free_slot)."
    )


class Capacity(Frozen):
    """A guest's room for hot-plugged NICs (``slots`` data, and ``capacity`` in the retained guest status)."""

    model_config = BUILT_ON_FIRST_USE

    machine: Literal["pc", "q35"] = Field(description="The machine family.")
    models: list[ModelCapacity] = Field(description="Per NIC model qmpnet hot-plugs.")
