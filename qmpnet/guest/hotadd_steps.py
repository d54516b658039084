"""Running a hot-add: host-side preparation, then the plan's QMP steps, each pushing its undo on a stack.

A hot-add touches up to three places: the host (a tap on a bridge, a NAT network, a macvtap on a host link, a PCI
function rebound to vfio-pci), QEMU's fd table (``getfd``), and the guest (``netdev_add``, ``device_add``,
``set_link``). Every action that succeeds pushes the action that reverts it on an
:class:`~qmpnet.guest.undo.UndoStack`; if a later action fails with a QEMU error the stack unwinds in reverse, so
the host and the guest end exactly as before. An
*unknown* outcome (no answer, lost connection) is not unwound: reverting ``netdev_add`` under a ``device_add`` that
may have succeeded would leave a NIC without a backend. The caller gets ``outcome_unknown`` and can list the NICs.
"""

from __future__ import annotations

import asyncio
import functools
import re
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from qmpnet.core.hotadd_plan import AddPlan, QmpCall, Step, fd_names, needs_tap_fds
from qmpnet.core.model import BridgeBackend, MacvtapBackend, NatBackend, NicSpec, PasstBackend, TapBackend, VfioBackend
from qmpnet.core.mtu import check_within
from qmpnet.errors import QmpCommandError, RemovalPending, Unsupported

if TYPE_CHECKING:
    from collections.abc import Callable

    from qmpnet.core.ports import HostNetwork, HostProcess, Monitor
    from qmpnet.guest.undo import UndoStack

__all__ = ["Attachment", "HostLink", "host_link", "prepare_host", "run_steps", "tap_owner", "undo_device"]

_OWNER_CHARS = re.compile(r"[^A-Za-z0-9_.:/-]")


@dataclass(frozen=True)
class Attachment:
    """What the host side holds for one NIC, to be released after its removal."""

    tap: str | None = None
    bridge: str | None = None
    network: str | None = None
    vfio_host: str | None = None
    vfio_driver: str | None = None
    passt: HostProcess | None = None


@dataclass(frozen=True)
class HostLink:
    """Where a NIC's host tap goes, known before planning: its bridge (bridge and NAT backends) and its MTU."""

    bridge: str | None = None
    mtu: int | None = None


#: What most hot-adds hold and know on the host: nothing (frozen, so one object serves them all).
_NOTHING: Final = Attachment()
_NO_LINK: Final = HostLink()


async def host_link(host: HostNetwork | None, spec: NicSpec) -> HostLink:
    """The bridge and the tap MTU of ``spec`` (``spec.mtu``, else the bridge's), for planning ``host_mtu``.

    Brings a NAT network up to learn its bridge.

    Raises:
        InvalidRequest: ``spec.mtu`` is above the bridge's MTU (``nic.mtu``), or the bridge is not one.
        NotFound: No such bridge or NAT network.
    """
    backend = spec.backend
    if host is None or not needs_tap_fds(spec) or isinstance(backend, MacvtapBackend):  # a macvtap: its parent's
        return HostLink(mtu=spec.mtu) if spec.mtu is not None else _NO_LINK
    bridge = await host.nat_bridge(backend.network) if isinstance(backend, NatBackend) else _bridge(backend)
    bridge_mtu = await host.bridge_mtu(bridge)
    if spec.mtu is not None:
        check_within(spec.mtu, bridge, bridge_mtu, field="nic.mtu")
    return HostLink(bridge, spec.mtu or bridge_mtu)


async def prepare_host(  # noqa: PLR0913, PLR0917 - the lane's collaborators, passed explicitly
    host: HostNetwork | None,
    monitor: Monitor,
    spec: NicSpec,
    plan: AddPlan,
    owner: str,
    undo: UndoStack,
    link: HostLink | None = None,
    taking: Callable[[Attachment], None] = lambda _: None,
) -> Attachment:
    """Do the host-side work ``spec``'s backend needs before its QMP steps; push the undo of each action.

    ``link`` is what :func:`host_link` found (the NAT network's bridge is looked up again without it). ``taking``
    is told what a PCI function's rebind will take before it happens (to record it: see
    :meth:`qmpnet.core.ports.HostNetwork.prepare_vfio`).

    Raises:
        Unsupported: The backend needs host networking and this guest has none configured.
        NotFound, InvalidRequest, Conflict, Unsupported: From the host side (bridge, tap, network, PCI function).
        QmpCommandError, OutcomeUnknown, GuestUnavailable: From passing the tap fds to QEMU.
    """
    backend = spec.backend
    if not isinstance(backend, TapBackend | VfioBackend | PasstBackend) and not needs_tap_fds(spec):
        return _NOTHING
    if host is None:
        raise Unsupported(f"nic.backend.type: {backend.type} needs host networking, which is not set up here",
                          field="nic.backend.type")
    if isinstance(backend, TapBackend):
        await host.check_tap(backend.ifname)
        if spec.mtu is not None:
            undo.push("mtu", await host.set_mtu(backend.ifname, spec.mtu, field="nic.mtu"))
        return _NOTHING
    if isinstance(backend, PasstBackend):
        return await _start_passt(host, backend, plan, undo)
    if isinstance(backend, VfioBackend):
        return await _take_function(host, backend, undo, taking)
    bridge: str | None = None
    if isinstance(backend, MacvtapBackend):
        assert plan.mac is not None  # noqa: S101 - every plan but vfio's has a MAC
        tap = await host.create_macvtap(
            backend.link, mode=backend.mode, mac=plan.mac, queues=spec.queues or 1, owner=tap_owner(owner)
        )
    else:
        bridge = link.bridge if link is not None and link.bridge is not None else None
        if bridge is None:
            bridge = await host.nat_bridge(backend.network) if isinstance(backend, NatBackend) else _bridge(backend)
        tap = await host.create_tap(bridge, queues=spec.queues or 1, owner=tap_owner(owner), mtu=spec.mtu)
    undo.push(f"tap {tap.name}", lambda: host.delete_tap(tap.name))
    names = fd_names(plan.netdev_id or plan.nic_id, len(tap.fds))
    try:
        await monitor.pass_fds(list(zip(names, tap.fds, strict=True)))
    finally:
        tap.close_fds()  # QEMU holds its own copies now (or none, on failure)
    undo.push("getfd", lambda: _close_fds(monitor, names))
    network = backend.network if isinstance(backend, NatBackend) else None
    return Attachment(tap=tap.name, bridge=bridge, network=network)


async def _take_function(
    host: HostNetwork, backend: VfioBackend, undo: UndoStack, taking: Callable[[Attachment], None]
) -> Attachment:
    """Check the PCI function, rebind it if asked (telling ``taking`` first); push the rebind's undo."""
    function = backend.host

    def took(original: str) -> None:
        taking(Attachment(vfio_host=function, vfio_driver=original))

    driver = await host.prepare_vfio(function, rebind=backend.rebind, taking=took)
    if driver is not None:
        undo.push("vfio-pci rebind", lambda: host.restore_vfio(function, driver))
    return Attachment(vfio_host=function, vfio_driver=driver)


async def _start_passt(host: HostNetwork, backend: PasstBackend, plan: AddPlan, undo: UndoStack) -> Attachment:
    """Start the NIC's passt before ``netdev_add`` connects QEMU to it; its undo ends it (a rollback)."""
    socket = plan.passt_socket
    if socket is None:
        raise Unsupported("nic.backend.type: passt was planned without its socket", field="nic.backend.type")
    process = await host.start_passt(socket, backend)
    undo.push(f"passt {socket}", lambda: host.stop_passt(socket, process))
    return Attachment(passt=process)


def _bridge(backend: object) -> str:
    assert isinstance(backend, BridgeBackend)  # noqa: S101 - narrowed by needs_tap_fds
    return backend.bridge


def tap_owner(owner: str) -> str:
    """The owner note of a NIC's tap (``<guest>/<nic>``, cut to what a tap's mark may hold)."""
    return _OWNER_CHARS.sub("_", owner)[-200:]


async def _close_fds(monitor: Monitor, names: tuple[str, ...]) -> None:
    for name in names:
        # netdev_add consumes the names it used; closefd then fails harmlessly.
        with suppress(QmpCommandError):
            await monitor.execute("closefd", {"fdname": name})


async def run_steps(monitor: Monitor, steps: tuple[Step, ...], undo: UndoStack, *, unplug_timeout: float) -> None:
    """Run ``steps`` in order, pushing each one's undo once it has succeeded.

    Raises:
        QmpCommandError, GuestUnavailable: A step failed; the caller unwinds ``undo``.
        OutcomeUnknown: A step got no answer; do not unwind (see the module docstring).
    """
    for step in steps:
        await monitor.execute(step.call.command, step.call.arguments)
        if step.undo is None:
            continue
        call, device = step.undo, step.undo_waits_for
        if device is not None:
            undo.push(step.call.command, functools.partial(undo_device, monitor, device, call, unplug_timeout))
        else:
            undo.push(step.call.command, functools.partial(monitor.execute, call.command, call.arguments))


async def undo_device(monitor: Monitor, device_id: str, call: QmpCall, timeout: float) -> None:
    """Unplug ``device_id`` again and wait for the guest to let go of it.

    Raises:
        RemovalPending: The guest did not acknowledge within ``timeout``.
    """
    async with monitor.listen({"DEVICE_DELETED"}, lambda e: e.device == device_id) as stream:
        await monitor.execute(call.command, call.arguments)
        try:
            async with asyncio.timeout(timeout):
                await stream.get()
        except TimeoutError as err:
            raise RemovalPending(f"the guest did not release device {device_id} within {timeout:g} s") from err
