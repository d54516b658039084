"""What qmpnet remembers of a guest: the records of its state store (pure; the files are :mod:`qmpnet.adapters.store`).

QEMU is the truth for what *exists*. A record holds only what QEMU cannot tell, so that any qmpnet process (the
CLI, a ``qmpnet.connect()`` block, ``qmpnet serve``), started after any other was killed at any point, can finish
or undo what was begun:

* **the NICs qmpnet created** (:class:`NicRecord`): the spec as planned (id, MAC, PCI address filled in), the
  netdev, the intended link state, and the host resources held for it (:class:`HostHold`: tap, NAT network,
  VFIO function and its original driver). A NIC's record is written *before* the first QMP command of its
  hot-add (state ``adding``) and of its removal (state ``removal_pending``), so a crash between two commands
  leaves a record that recovery resolves against what QEMU shows;
* **operations** by id (an MQTT ``transaction``, or a generated id): written before the first command, with their
  outcome once known, so a repeated transaction is answered and never applied twice, across restarts too;
* **the desired NIC set** (:class:`DesiredSet`), declared by ``qmpnet apply`` or the retained MQTT ``desired``
  topic and kept in step by the imperative ops;
* **the QEMU instance** the NICs belong to: a QEMU restarted on the same socket is a new instance, whose NICs are
  all gone (their host resources are released, the desired set is added back by the controller);
* **the boot** (the kernel's boot id) the records were written in: a host reboot takes every QEMU, tap and driver
  binding with it, so a record of an earlier boot is void (:meth:`GuestRecord.for_boot`) except its desired set.

Durable against what: the record protects against the death of the qmpnet process while QEMU lives on, which a
write that reached the page cache survives; only the desired set must outlive a reboot, and the store keeps a copy
of it in a file of its own, fsync'd (:mod:`qmpnet.adapters.store`).

The format has a version (:data:`FORMAT_VERSION`). Version 1 (the desired set inside the record, no boot id) is
read and migrated (:func:`migrated`); any other version is not guessed: the store moves such a record aside.
"""

# Without `from __future__ import annotations`: pydantic would compile each field's annotation from its string,
# ~70 k instructions a field in every new process (docs/performance.md).

from functools import partial
from operator import attrgetter, is_not
from typing import Annotated, Any, Final, Literal

from pydantic import Field

from qmpnet.core.model import (
    LinkState,
    NicSpec,
    ObservedBackend,
    PciAddress,
    Shape,
    Vlan,
)
from qmpnet.core.model_base import Frozen, empty_list, replaced

__all__ = [
    "FORMAT_VERSION",
    "GONE_KEPT",
    "MIGRATED_VERSIONS",
    "DesiredDocument",
    "DesiredSet",
    "GuestRecord",
    "HostHold",
    "NicRecord",
    "OperationRecord",
    "RecordState",
    "migrated",
]

#: The version of the on-disk format; bumped on any incompatible change.
FORMAT_VERSION = 2
#: Older versions :func:`migrated` reads.
MIGRATED_VERSIONS: Final = frozenset({1})
#: How many NICs removed by recovery are remembered (so a later ``nic del`` answers ``removed``).
GONE_KEPT = 64

RecordState = Literal["adding", "active", "removal_pending"]


class HostHold(Frozen):
    """The host resources held for one NIC, released once its device and backend are gone."""

    owner: str | None = Field(default=None, description="The owner mark on taps made for the NIC (guest/nic).")
    tap: str | None = Field(default=None, description="The tap qmpnet made (bridge, NAT and macvtap backends).")
    bridge: str | None = Field(default=None, description="The bridge the tap is enslaved to.")
    network: str | None = Field(default=None, description="The NAT network the NIC uses.")
    vhost: bool = Field(default=False, description="Its tap netdev was added with vhost=on (vhost-net).")
    vfio_host: str | None = Field(default=None, description="The host PCI function handed to the guest.")
    vfio_driver: str | None = Field(default=None, description="Its driver before qmpnet rebound it to vfio-pci.")
    passt_socket: str | None = Field(default=None, description="The socket of the NIC's passt (passt backend).")
    passt_pid: int | None = Field(default=None, description="The pid of the NIC's passt, once started.")
    passt_started: int | None = Field(
        default=None, description="Its start time (clock ticks after boot): a recycled pid is never signalled."
    )

    @property
    def empty(self) -> bool:
        """Whether nothing is held."""
        return self.tap is None and self.vfio_driver is None and self.owner is None


class NicRecord(Frozen):
    """A NIC qmpnet created (or is creating, or removing; or a NIC it did not create that it was asked to remove)."""

    id: str
    spec: NicSpec | None = Field(
        description="The spec as planned (id, MAC and PCI address filled in); null for a NIC qmpnet did not create."
    )
    netdev: str | None
    state: RecordState
    link: LinkState = Field(description="The intended link state, re-applied after a reconnect.")
    host: HostHold = Field(default_factory=HostHold)
    pci: PciAddress | None = None
    view: ObservedBackend | None = Field(
        default=None, description="The backend as the last live change left it (bridge, VLANs, shaping)."
    )
    vlan: Vlan | None = Field(default=None, description="The VLANs set by a live change (nic/update).")
    shape: Shape | None = Field(default=None, description="The shaping set by a live change (nic/update).")
    operation: str | None = Field(default=None, description="The operation that last changed this NIC.")
    pending_since: float | None = Field(
        default=None,
        description="removal_pending: when QEMU accepted the unplug request (Unix time). Null while that is not "
        "known (device_del not answered yet): only then does a full recovery send device_del again.",
    )
    stuck_reported: float | None = Field(
        default=None, description="When unplug_stuck was told for this pending removal (it is told once)."
    )


OperationKind = Literal["nic/add", "nic/del", "nic/link", "nic/update", "apply"]


class OperationRecord(Frozen):
    """One change a caller asked for: written before its first QMP command, its outcome once known."""

    id: str = Field(description="The caller's transaction, or an id qmpnet generated.")
    op: str
    nic: str | None = None
    started: float
    finished: float | None = None
    outcome: dict[str, Any] | None = Field(
        default=None, description='{"status": "ok", "data": ...} or {"status": "error", "error": {...}}.'
    )


class DesiredDocument(Frozen):
    """A desired NIC set as declared: the retained MQTT ``.../guest/<g>/desired`` payload, ``qmpnet apply``'s file.

    An empty retained payload (not JSON) clears the guest's set.
    """

    generation: int = Field(default=0, ge=0, description="Higher replaces the set; lower is ignored; same: no change.")
    nics: list[NicSpec] = Field(
        default_factory=empty_list, description="The NICs the guest should have; each needs an id; ids and MACs unique."
    )
    prune: bool = Field(default=False, description="Remove NICs qmpnet created that are not in the set.")


class DesiredSet(DesiredDocument):
    """The NICs a guest should have (``qmpnet apply``, the retained MQTT ``desired`` topic, imperative ops)."""

    source: Literal["apply", "mqtt", "imperative"] = "imperative"


class GuestRecord(Frozen):
    """Everything qmpnet keeps about one guest (one file in the state directory)."""

    version: Annotated[int, Field(ge=FORMAT_VERSION, le=FORMAT_VERSION)] = FORMAT_VERSION
    address: str
    name: str
    boot: str | None = Field(default=None, description="The kernel boot id the records were written in.")
    instance: str | None = Field(default=None, description="The QEMU instance the NIC records belong to.")
    qemu_pid: int | None = Field(
        default=None, description="That QEMU's pid (a local unix socket's peer): once it is gone, so are its NICs."
    )
    qemu_started: int | None = Field(
        default=None, description="Its start time (clock ticks after boot): a recycled pid is not taken for it."
    )
    nics: dict[str, NicRecord] = Field(default_factory=dict)
    links: dict[str, LinkState] = Field(
        default_factory=dict, description="Link intent of NICs qmpnet did not create (cold-plugged ones)."
    )
    gone: dict[str, float] = Field(
        default_factory=dict, description="NICs whose removal recovery finished, by id, when: `nic del` says removed."
    )
    operations: dict[str, OperationRecord] = Field(default_factory=dict)
    desired: DesiredSet | None = Field(
        default=None, description="Also kept by the store in a file of its own, fsync'd: it outlives a reboot."
    )

    def for_boot(self, boot: str | None) -> "GuestRecord":
        """This record as it stands in boot ``boot``: whole if written in it, else only the desired set.

        The rest named QEMU processes, taps and driver bindings that a reboot took away.
        """
        if boot is None or self.boot == boot:
            return self
        return GuestRecord(address=self.address, name=self.name, boot=boot, desired=self.desired)

    def with_nic(self, nic: NicRecord) -> "GuestRecord":
        """This record with ``nic`` added or replaced."""
        gone = {k: v for k, v in self.gone.items() if k != nic.id} if nic.id in self.gone else self.gone
        return replaced(self, {"nics": {**self.nics, nic.id: nic}, "gone": gone})

    def without_nic(self, nic_id: str, *, gone_at: float | None = None) -> "GuestRecord":
        """This record without NIC ``nic_id``; ``gone_at`` remembers that recovery (not a caller) removed it."""
        update: dict[str, object] = {"nics": {k: v for k, v in self.nics.items() if k != nic_id}}
        if gone_at is not None:
            kept = sorted(self.gone.items(), key=lambda item: item[1])[-(GONE_KEPT - 1) :]
            update["gone"] = {**dict(kept), nic_id: gone_at}
        return replaced(self, update)

    def with_link(self, nic_id: str, link: LinkState) -> "GuestRecord":
        """This record with the link intent of ``nic_id`` (its own record's, or a cold-plugged NIC's)."""
        nic = self.nics.get(nic_id)
        if nic is not None:
            return self.with_nic(replaced(nic, {"link": link}))
        return replaced(self, {"links": {**self.links, nic_id: link}})

    def with_operation(self, operation: OperationRecord) -> "GuestRecord":
        """This record with ``operation`` added or replaced."""
        return replaced(self, {"operations": {**self.operations, operation.id: operation}})

    def pruned(self, now: float, keep: float) -> "GuestRecord":
        """This record without finished operations older than ``keep`` seconds."""
        # Every write prunes, and nearly always finds nothing to prune: that is told from the oldest finished time,
        # found without a Python loop over the operations (a hot-add writes twice; a guest keeps dozens of them).
        oldest = min(filter(_is_time, map(_FINISHED, self.operations.values())), default=None)
        if oldest is None or now - oldest <= keep:
            return self
        operations = {
            key: op for key, op in self.operations.items() if op.finished is None or now - op.finished <= keep
        }
        if len(operations) == len(self.operations):
            return self
        return replaced(self, {"operations": operations})


_FINISHED: Final = attrgetter("finished")
_is_time: Final = partial(is_not, None)


def migrated(data: dict[str, Any], *, boot: str | None) -> dict[str, Any]:
    """A record document of a version in :data:`MIGRATED_VERSIONS` in the current format.

    Version 1 had no boot id: ``boot`` is the boot the caller knows it was written in (``None``: an earlier one,
    so only its desired set is kept by :meth:`GuestRecord.for_boot`).
    """
    return {**data, "version": FORMAT_VERSION, "boot": boot or "earlier-boot"}
