"""A NIC's MTU (``NicSpec.mtu``, ``NicUpdate.mtu``): the rules, pure.

Two things carry a NIC's MTU, and they differ in what can change them:

* **the host tap** (bridge, nat and tap backends): qmpnet sets its MTU when it makes the tap and whenever asked
  (``nic/update``). Without ``mtu``, a tap on a bridge or a NAT network gets the bridge's MTU, as Proxmox does
  since users were confused by VXLAN's 1450. A tap MTU above its bridge's is refused: the bridge would drop what
  does not fit, silently.
* **virtio-net-pci's ``host_mtu``** device property, which the guest's driver takes as its interface MTU (and its
  ceiling). It is set only at ``device_add``, and only when the MTU is not Ethernet's 1500: a device made without
  it is exactly the device QEMU makes by default, so a migration to a QEMU started without it keeps working (the
  Proxmox bug). It cannot change on a live device, so a live change sets the tap and says, in ``warnings``, that
  the guest must apply the MTU itself; a live MTU above the device's ``host_mtu`` is refused, since the guest
  driver cannot go past it.

e1000, e1000e and rtl8139 have no such property: their guests keep 1500 until they set the MTU themselves, and the
answer's ``warnings`` says so rather than pretending. Backends without a host tap (user, hubport, stream, dgram,
vfio, and a tap made by QEMU's bridge helper) cannot take an MTU from qmpnet and are refused, naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Final

from pydantic import Field

from qmpnet.errors import InvalidRequest

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = [
    "ETHERNET_MTU",
    "MTU_DESCRIPTION",
    "MTU_UPDATE_DESCRIPTION",
    "Mtu",
    "add_warnings",
    "check_mtu_backend",
    "check_within",
    "host_mtu",
    "update_warnings",
]

#: Ethernet's MTU: what a guest interface has unless told otherwise.
ETHERNET_MTU: Final = 1500
#: The smallest MTU IPv4 allows (RFC 791) and the largest a Linux link takes.
MIN_MTU: Final = 68
MAX_MTU: Final = 65535
#: The models whose device takes ``host_mtu``.
HOST_MTU_MODELS: Final = frozenset({"virtio-net-pci"})

Mtu = Annotated[int, Field(ge=MIN_MTU, le=MAX_MTU)]

MTU_DESCRIPTION: Final = (
    "The NIC's MTU, 68-65535 (tap-based backends: bridge, nat, tap). The host tap gets it, virtio-net-pci also "
    "host_mtu; absent: a bridge or NAT NIC gets its bridge's MTU. Larger than the bridge's is refused. e1000, "
    "e1000e and rtl8139 ignore host_mtu: the answer's warnings say the guest must set it itself."
)
MTU_UPDATE_DESCRIPTION: Final = (
    "Set the MTU of the NIC's host tap (at most its bridge's); host_mtu cannot change on a live device, so the "
    "answer's warnings say the guest must apply it; above a virtio NIC's host_mtu is refused."
)


def check_mtu_backend(mtu: int | None, backend: BaseModel) -> None:
    """Refuse an MTU for a backend without a host tap qmpnet manages.

    Raises:
        InvalidRequest: ``nic.mtu`` with a user, hubport, stream, dgram or vfio backend, or a bridge helper's tap.
    """
    kind = str(getattr(backend, "type", ""))
    if mtu is None or (kind in {"bridge", "nat", "tap"} and not getattr(backend, "helper", False)):
        return
    what = "QEMU's bridge helper makes the tap" if kind == "bridge" else f"a {kind} backend has no host tap"
    raise InvalidRequest(
        f"nic.mtu: an MTU needs a host tap qmpnet manages (bridge, nat or tap backend); {what}", field="nic.mtu"
    )


def check_within(mtu: int, bridge: str, bridge_mtu: int, *, field: str) -> None:
    """Refuse ``mtu`` above the MTU of ``bridge``, the tap's bridge.

    Raises:
        InvalidRequest: It is larger (``field`` names the input).
    """
    if mtu > bridge_mtu:
        raise InvalidRequest(
            f"{field}: {mtu} is larger than the MTU of bridge {bridge} ({bridge_mtu}); the bridge would drop what "
            f"does not fit (raise the bridge's MTU first, or ask for at most {bridge_mtu})",
            field=field,
        )


def host_mtu(model: str, mtu: int | None) -> int | None:
    """The ``host_mtu`` to give a device of ``model`` whose link has MTU ``mtu`` (``None``: leave it out)."""
    if model in HOST_MTU_MODELS and mtu is not None and mtu != ETHERNET_MTU:
        return mtu
    return None


def add_warnings(model: str, mtu: int | None) -> tuple[str, ...]:
    """What the answer of a hot-add says about the MTU: the guest must set it itself when the device cannot."""
    if mtu is None or mtu == ETHERNET_MTU or model in HOST_MTU_MODELS:
        return ()
    warning = (f"mtu: {model} ignores host_mtu; the guest keeps MTU {ETHERNET_MTU} until it sets {mtu} itself "
               f"(ip link set dev IFACE mtu {mtu})")
    return (warning,)


def update_warnings(model: str, mtu: int, device_mtu: int | None) -> tuple[str, ...]:
    """What the answer of a live MTU change says: the host tap has it, the guest must apply it.

    Raises:
        InvalidRequest: ``update.mtu`` above the ``host_mtu`` (``device_mtu``) a virtio device was added with.
    """
    if model in HOST_MTU_MODELS and device_mtu and mtu > device_mtu:
        raise InvalidRequest(
            f"update.mtu: {mtu} is above this NIC's host_mtu ({device_mtu}), the guest driver's ceiling, which is "
            "fixed when the device is added; remove the NIC and add it again with the new mtu",
            field="update.mtu",
        )
    why = "host_mtu is fixed when the device is added" if model in HOST_MTU_MODELS else f"{model} ignores host_mtu"
    return (f"mtu: the host tap has MTU {mtu}; {why}, so the guest must apply it (ip link set dev IFACE mtu {mtu})",)
