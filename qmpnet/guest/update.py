"""Changing a NIC live (``nic/update``): move it, set its VLANs, shape it, set its link, without an unplug.

The guest keeps its interface, its name and its state because nothing in QEMU's device model changes: a move
happens entirely on the host (the NIC's tap is re-enslaved to another bridge), and so do VLANs and shaping (on the
tap's bridge port and the tap's qdiscs). QEMU is only asked to flip the link and to announce the guest. That is
also why only NICs whose backend is a host tap (bridge, nat, tap) can be moved, tagged or shaped; every NIC can
have its link set, and a vfio NIC nothing at all.

A full change runs in this order, each step pushing its undo on an :class:`~qmpnet.guest.undo.UndoStack`:

1. ``set_link`` down, for a move of a NIC whose link is up, so that the guest sees its carrier go;
2. re-enslave the tap to the new bridge (the NAT network is brought up first if it is one);
3. the VLANs, after the move because a new port starts in its bridge's default VLAN;
4. the shaping, which stays with the tap across moves;
5. after ``update.link_flap`` seconds of carrier loss, ``set_link`` to the final state (the guest renews DHCP);
6. ``announce-self`` for a moved or re-tagged NIC whose link is up, so that switches learn its new port.

If a step fails, the stack unwinds newest first, so the NIC ends where it was (same bridge, VLANs, shaping,
link). An *unknown* outcome (QEMU did not answer ``set_link``) is not unwound, as for a hot-add: the caller gets
``outcome_unknown`` and can list the NICs. Deciding what to do is pure (:func:`plan_update`); the run is
:func:`run_update`. The lane calls it with what it knows of the NIC; when it knows nothing (a NIC added by another
process) the tap is found on the host: by the owner mark qmpnet put on it, else by the fd QEMU holds for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from qmpnet.core.model import BridgeBackend, Nic, NicUpdate, ObservedBackend, Shape, Vlan
from qmpnet.core.mtu import HOST_MTU_MODELS, update_warnings
from qmpnet.core.nic_filter import FILTERABLE
from qmpnet.errors import NotFound, OutcomeUnknown, QmpCommandError, QmpnetError, Unsupported
from qmpnet.guest.hotadd_steps import Attachment, tap_owner
from qmpnet.guest.undo import UndoStack

if TYPE_CHECKING:
    from qmpnet.core.nic_filter import NicFilter
    from qmpnet.core.ports import HostNetwork, Monitor, TapPort
    from qmpnet.settings import UpdateSettings

__all__ = ["KnownNic", "UpdatePlan", "UpdateResult", "plan_update", "run_update"]

log = logging.getLogger(__name__)

LinkState = Literal["up", "down"]
#: Backends whose QEMU netdev is a host tap: they can be moved, tagged and shaped.
TAP_KINDS = frozenset({"bridge", "nat", "tap"})  # not macvtap: it sits on no bridge and qmpnet does not shape it
#: Options of a NIC's backend view that the update itself sets (the rest is kept as the lane saw it).
_UPDATED_OPTIONS = frozenset({"bridge", "network", "vlan", "trunks", "rate", "burst", "delay", "jitter", "loss"})
_QEMU_INTERNAL = frozenset({"fd", "fds"})


@dataclass(frozen=True)
class KnownNic:
    """What the lane knows of a NIC when it changes it.

    Attributes:
        nic: The NIC as the lane sees it (id, netdev, link, QEMU's view of the backend).
        asked: The backend as it was asked for (bridge, nat, tap ... with its options), if this lane added it.
        attachment: The host side the lane holds for it, if this lane added it.
        owner: ``<guest>/<nic id>``, the mark qmpnet put on the tap it made for the NIC.
        filter: The anti-spoofing filter the record says the NIC's tap has.
    """

    nic: Nic
    asked: ObservedBackend | None = None
    attachment: Attachment | None = None
    owner: str = ""
    filter: NicFilter | None = None

    @property
    def kind(self) -> str:
        """The backend type as asked for, else as QEMU shows it (a tap shows as ``tap`` there)."""
        if self.asked is not None:
            return self.asked.type
        return self.nic.backend.type if self.nic.backend is not None else "none"


@dataclass(frozen=True)
class UpdatePlan:
    """What a validated update will do to a NIC (pure: decided before anything is touched)."""

    needs_host: bool
    moves: bool
    vlan: bool
    shape: bool
    link: LinkState | None
    mtu: int | None = None
    filter: bool = False


@dataclass(frozen=True)
class UpdateResult:
    """The NIC after a live change, and what the lane should remember of it."""

    nic: Nic
    attachment: Attachment | None
    backend: ObservedBackend | None
    warnings: tuple[str, ...] = ()


def plan_update(update: NicUpdate, known: KnownNic) -> UpdatePlan:
    """Check that ``update`` can be applied to ``known``'s NIC and say what it will do.

    Raises:
        Unsupported: A vfio NIC (nothing can change), or a move, VLAN or shape for a NIC whose backend is not a
            host tap (the field is named).
    """
    kind = known.kind
    if kind == "vfio":
        first = next(name for name in ("backend", "vlan", "shape", "link", "mtu") if name in update.model_fields_set)
        raise Unsupported(f"update.{first}: NIC {update.id} is an assigned host device (vfio); it has no backend, "
                          "VLAN, shaping or link qmpnet can change", field=f"update.{first}")
    tap_based = kind in TAP_KINDS
    host_fields = [name for name in ("backend", "vlan", "shape", "mtu", "filter") if name in update.model_fields_set]
    if host_fields and not tap_based:
        raise Unsupported(
            f"update.{host_fields[0]}: NIC {update.id} has a {kind} backend; only its link can be changed live (a "
            "move, VLANs and shaping need a backend that is a host tap: bridge, nat or tap)",
            field=f"update.{host_fields[0]}",
        )
    if update.filter is not None and (kind not in FILTERABLE or (known.asked and known.asked.options.get("helper"))):
        raise Unsupported(f"update.filter: NIC {update.id} has a {kind} backend; anti-spoofing needs a tap qmpnet "
                          f"made on a bridge ({', '.join(sorted(FILTERABLE))})", field="update.filter")
    if update.filter is not None and update.filter.mac and not known.nic.mac:
        raise Unsupported(f"update.filter.mac: QEMU shows no MAC for NIC {update.id}", field="update.filter.mac")
    moves = update.backend is not None
    return UpdatePlan(bool(host_fields), moves, update.changes_vlan, update.changes_shape, update.link, update.mtu,
                      filter=update.changes_filter)


async def run_update(
    monitor: Monitor, host: HostNetwork | None, known: KnownNic, update: NicUpdate, settings: UpdateSettings
) -> UpdateResult:
    """Apply ``update`` to ``known``'s NIC; atomic: on failure what was done is undone.

    Waits for the host work, the QMP commands and, for a move, ``settings.link_flap`` seconds of link down.

    Raises:
        Unsupported: The NIC's backend cannot do it, host networking is not set up, its tap cannot be found, or
            the host lacks a kernel feature (VLAN filtering, netem, ...).
        NotFound, InvalidRequest, Forbidden, Conflict: From the host side (no such bridge or network, ...), with
            the field named.
        QmpCommandError: QEMU refused ``set_link`` or ``announce-self`` (what was done is undone).
        OutcomeUnknown: QEMU did not answer; nothing was undone.
        GuestUnavailable: The monitor is gone.
    """
    plan = plan_update(update, known)
    nic = known.nic
    if not plan.needs_host:
        return await _link_only(monitor, known, plan.link)
    if host is None:
        raise Unsupported("update: changing the host side of a NIC needs host networking, which is not set up here",
                          field="update")
    tap, ours = await _find_tap(monitor, host, known)
    port = await host.tap_port(tap)
    warnings = () if plan.mtu is None else update_warnings(nic.model, plan.mtu, await _device_mtu(monitor, nic))
    undo = UndoStack()
    try:
        after = await _apply(monitor, host, _Target(known, port, ours), update, plan, undo, settings)
    except OutcomeUnknown as err:
        err.add_note("qmpnet did not roll back: QEMU may have applied the step; list the NICs to see")
        raise
    except QmpnetError as err:
        await undo.unwind(err)
        raise
    log.info("NIC %s: changed live (%s)", nic.id, ", ".join(sorted(update.model_fields_set - {"id"})))
    return replace(after, warnings=warnings)


async def _device_mtu(monitor: Monitor, nic: Nic) -> int | None:
    """The ``host_mtu`` the NIC's device was added with (0: none), where the model has the property."""
    if nic.model not in HOST_MTU_MODELS:
        return None
    try:
        value = await monitor.execute("qom-get", {"path": f"/machine/peripheral/{nic.id}", "property": "host_mtu"})
    except QmpCommandError:
        return None  # a device without an id path (cold-plugged anonymously): the guest tells, qmpnet cannot
    return value if isinstance(value, int) else None


async def _link_only(monitor: Monitor, known: KnownNic, link: LinkState | None) -> UpdateResult:
    nic = known.nic
    if link is not None:  # even when the lane believes it is already so: QEMU is the truth, and it is idempotent
        await _set_link(monitor, nic.id, link)
    return UpdateResult(nic.model_copy(update={"link": link or nic.link}), known.attachment, known.asked)


async def _find_tap(monitor: Monitor, host: HostNetwork, known: KnownNic) -> tuple[str, bool]:
    """The NIC's tap, and whether qmpnet made it (else it is an operator's tap, given by name)."""
    nic = known.nic
    observed = nic.backend.options if nic.backend is not None else {}
    asked = known.asked.options if known.asked is not None else {}
    if observed.get("helper") or asked.get("helper") in ("true", "True"):
        raise Unsupported(f"update: the tap of NIC {nic.id} was made by QEMU's bridge helper; qmpnet cannot change "
                          "it live (add the NIC with a tap qmpnet makes)", field="update")
    made = known.attachment.tap if known.attachment else None
    for tap, ours in ((made, True), (asked.get("tap"), True), (asked.get("ifname"), False),
                      (observed.get("ifname"), False)):
        if tap:
            return tap, ours
    fd = (observed.get("fd") or observed.get("fds") or "").split(":")[0]
    pid = getattr(monitor, "peer_pid", None)  # the QMP adapter knows QEMU's pid on a unix socket; fakes need not
    found = await host.find_tap(tap_owner(known.owner), pid=pid if isinstance(pid, int) else None,
                                fd=int(fd) if fd.isdigit() else None)
    if found is None:
        raise Unsupported(f"update: the host tap of NIC {nic.id} cannot be found (qmpnet finds the taps it made, "
                          "and taps given by name)", field="update")
    return found, True


@dataclass(frozen=True)
class _Target:
    """The NIC being changed: what the lane knows, its tap as the host shows it, and whether qmpnet made it."""

    known: KnownNic
    port: TapPort
    ours: bool


async def _apply(  # noqa: PLR0913, PLR0917 - the run's collaborators and its state, passed explicitly
    monitor: Monitor,
    host: HostNetwork,
    target: _Target,
    update: NicUpdate,
    plan: UpdatePlan,
    undo: UndoStack,
    settings: UpdateSettings,
) -> UpdateResult:
    nic, port = target.known.nic, target.port
    bridge, network = port.bridge, port.network
    if plan.moves:
        bridge, network = await _target(host, update)
    moved = bridge != port.bridge
    final: LinkState = plan.link or nic.link
    flapped = moved and nic.link == "up"
    down_since = time.monotonic()
    if flapped:
        await _set_link(monitor, nic.id, "down")
        undo.push("set_link down", lambda: _set_link(monitor, nic.id, "up"))
    if moved and bridge is not None:
        undo.push(f"move to {bridge}", await host.move_tap(port.name, bridge, field=_bridge_field(update)))
    await _change_tap(host, target, update, plan, undo)
    link_now: LinkState = "down" if flapped else nic.link
    if flapped and final == "up":
        await asyncio.sleep(max(0.0, settings.link_flap - (time.monotonic() - down_since)))
    if final != link_now or plan.link is not None:
        await _set_link(monitor, nic.id, final)
        undo.push(f"set_link {final}", lambda: _set_link(monitor, nic.id, link_now))
    if (moved or plan.vlan) and final == "up":
        await monitor.execute("announce-self", {
            "initial": settings.announce_initial, "max": settings.announce_max,
            "rounds": settings.announce_rounds, "step": settings.announce_step, "interfaces": [nic.id],
        })  # fmt: skip
    vlan = update.vlan if plan.vlan else (None if moved else port.vlan)
    shape = update.shape if plan.shape else port.shape
    return _result(target, bridge, network, vlan, shape, final)


async def _change_tap(host: HostNetwork, target: _Target, update: NicUpdate, plan: UpdatePlan, undo: UndoStack) -> None:
    """The tap's own changes (after a move): VLANs, shaping, MTU (a move gave it the new bridge's), filter."""
    port = target.port
    if plan.vlan:
        undo.push("vlan", await host.set_vlan(port.name, update.vlan))
    if plan.shape:
        undo.push("shape", await host.set_shape(port.name, update.shape))
    if plan.mtu is not None:
        undo.push("mtu", await host.set_mtu(port.name, plan.mtu, field="update.mtu"))
    if plan.filter:
        mac = target.known.nic.mac or ""  # plan_update refused a MAC check without one
        undo.push("filter", await host.set_filter(port.name, mac, update.filter, before=target.known.filter))


async def _target(host: HostNetwork, update: NicUpdate) -> tuple[str, str | None]:
    backend = update.backend
    if isinstance(backend, BridgeBackend):
        return backend.bridge, None
    assert backend is not None  # noqa: S101 - plan_update saw a move
    try:
        return await host.nat_bridge(backend.network), backend.network
    except NotFound as err:
        if err.field != "nic.backend.network":
            raise
        message = err.message.replace("nic.backend.network", "update.backend.network")
        raise NotFound(message, field="update.backend.network") from err


def _bridge_field(update: NicUpdate) -> str:
    return "update.backend.bridge" if isinstance(update.backend, BridgeBackend) else "update.backend.network"


async def _set_link(monitor: Monitor, nic_id: str, link: LinkState) -> None:
    await monitor.execute("set_link", {"name": nic_id, "up": link == "up"})


def _result(  # noqa: PLR0913, PLR0917 - the NIC's new state, field by field
    target: _Target,
    bridge: str | None,
    network: str | None,
    vlan: Vlan | None,
    shape: Shape | None,
    link: LinkState,
) -> UpdateResult:
    """The NIC's new view: its backend options say where it is plugged in now, in the API's notation."""
    known, tap = target.known, target.port.name
    kind = ("nat" if network is not None else "bridge") if target.ours else "tap"
    base = known.asked or known.nic.backend
    options = {k: v for k, v in (base.options if base else {}).items() if k not in _UPDATED_OPTIONS | _QEMU_INTERNAL}
    options |= {"tap": tap} if kind != "tap" else {"ifname": tap}
    options |= ({"bridge": bridge} if bridge else {}) | ({"network": network} if network else {})
    options |= (vlan.options() if vlan else {}) | (shape.options() if shape else {})
    backend = ObservedBackend(type=kind, options=options)
    attachment = known.attachment
    if kind != "tap":  # a tap qmpnet made: the lane releases it (and its IFB) on removal
        previous = attachment or Attachment()
        attachment = Attachment(tap=tap, bridge=bridge, network=network, vfio_host=previous.vfio_host,
                                vfio_driver=previous.vfio_driver)
    nic = known.nic.model_copy(update={"link": link, "backend": backend})
    return UpdateResult(nic, attachment, backend)
