"""``qmpnet nic``: hot-add, remove, link, change, capture and list one guest's NICs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from qmpnet.cli.connect import GuestCall, check_request
from qmpnet.cli.exits import checked, fail
from qmpnet.cli.nic_flags import BackendType, FilterFlags, HostFlags, build_backend, build_update
from qmpnet.cli.options import LinkArg, guest_options
from qmpnet.cli.output import format_rows
from qmpnet.errors import InvalidRequest

if TYPE_CHECKING:
    from collections.abc import Sequence

    from qmpnet.core.model import CaptureResult, Nic
    from qmpnet.core.ports import GuestOps

# Every qmpnet module but the errors is imported inside the function that needs it (docs/performance.md).

app = typer.Typer(help="Hot-add, remove, link and list a guest's NICs.", no_args_is_help=True, rich_markup_mode=None)

NicIdArg = Annotated[str, typer.Argument(metavar="ID", help="The NIC's id.")]
# The anti-spoofing flags, the same on ``nic add`` and ``nic set`` (docs/host-networking.md, "Anti-spoofing").
FilterOn = Annotated[bool, typer.Option("--filter", help="Anti-spoofing: drop frames from another MAC (bridge, nat).")]
FilterIpv4 = Annotated[list[str] | None, typer.Option(
    "--filter-ipv4", metavar="ADDR", help="Anti-spoofing: an allowed IPv4 source (repeat; 'none': no IPv4).")]
FilterIpv6 = Annotated[list[str] | None, typer.Option(
    "--filter-ipv6", metavar="ADDR", help="Anti-spoofing: an allowed IPv6 source besides link-local (repeat).")]
FilterNoMac = Annotated[bool, typer.Option("--no-filter-mac", help="Anti-spoofing: do not check the source MAC.")]
FilterDhcp = Annotated[bool, typer.Option("--filter-dhcp-server", help="Anti-spoofing: let the guest serve DHCP.")]


def nic_table(nics: Sequence[Nic]) -> str:
    """Format NICs as a table."""
    rows = [("ID", "MODEL", "MAC", "NETDEV", "BACKEND", "PCI", "LINK", "STATE")]
    for nic in nics:
        pci = f"{nic.pci.bus}:{nic.pci.slot:02x}.{nic.pci.function}" if nic.pci else "-"
        backend = nic.backend.type if nic.backend else "-"
        rows.append((nic.id, nic.model, nic.mac or "-", nic.netdev or "-", backend, pci, nic.link, _state(nic)))
    return format_rows(rows)


def _state(nic: Nic) -> str:
    """The NIC's state; a pending removal with since when (UTC), e.g. ``removal_pending since 05:41:07Z``."""
    if nic.pending_since is None:
        return nic.state
    since = time.gmtime(nic.pending_since)
    day = "" if since[:3] == time.gmtime()[:3] else time.strftime("%Y-%m-%d ", since)
    return f"{nic.state} since {day}{time.strftime('%H:%M:%SZ', since)}"
def warning_lines(nic: Nic) -> str:
    """``warning: ...`` lines under a NIC's table row, one per warning of the answer."""
    return "".join(f"\nwarning: {warning}" for warning in nic.warnings)


def backend_line(nic: Nic) -> str:
    """``backend: bridge bridge=br1 tap=vnet0 rate=5mbit``, under a NIC's table row."""
    if nic.backend is None:
        return ""
    options = " ".join(f"{key}={value}" for key, value in nic.backend.options.items())
    return f"\nbackend: {nic.backend.type} {options}".rstrip()


@app.command("add")
@guest_options(qga=True, verify=True, verify_address=True)
def nic_add(
    call: GuestCall,
    model: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL",
            help="rtl8139, e1000, e1000e, virtio-net-pci (or virtio); default virtio-net-pci, none for vfio.",
        ),
    ] = None,
    nic_id: Annotated[str | None, typer.Option("--id", metavar="ID", help="Device id (generated when absent).")] = None,
    mac: Annotated[
        str | None, typer.Option(metavar="MAC", help="MAC address (a free 52:54:00:xx:xx:xx when absent).")
    ] = None,
    backend: Annotated[BackendType, typer.Option(help="Backend type.")] = BackendType.user,
    hub: Annotated[
        int | None, typer.Option(metavar="N", help="Hub number for --backend hubport (the old vlan=n).")
    ] = None,
    hostfwd: Annotated[
        list[str] | None, typer.Option(metavar="RULE", help="user: port forward, e.g. tcp:127.0.0.1:2222-:22.")
    ] = None,
    net: Annotated[str | None, typer.Option(metavar="CIDR", help="user: guest network, e.g. 10.0.3.0/24.")] = None,
    restrict: Annotated[bool, typer.Option("--restrict", help="user: isolate the guest from the host.")] = False,
    listen: Annotated[str | None, typer.Option(metavar="ADDR", help="stream: listen on /path or host:port.")] = None,
    connect_to: Annotated[
        str | None, typer.Option("--connect", metavar="ADDR", help="stream: connect to /path or host:port.")
    ] = None,
    local: Annotated[str | None, typer.Option(metavar="ADDR", help="dgram: local /path or host:port.")] = None,
    remote: Annotated[str | None, typer.Option(metavar="ADDR", help="dgram: remote /path or host:port.")] = None,
    bridge: Annotated[str | None, typer.Option(metavar="BRIDGE", help="bridge: the host bridge (e.g. br0).")] = None,
    helper: Annotated[
        bool, typer.Option("--helper", help="bridge: let QEMU's bridge helper make the tap (policy).")
    ] = False,
    network: Annotated[
        str | None, typer.Option(metavar="NAME", help="nat: the NAT network (default: default).")
    ] = None,
    ifname: Annotated[str | None, typer.Option(metavar="TAP", help="tap: an existing tap device.")] = None,
    parent: Annotated[
        str | None, typer.Option(metavar="LINK", help="macvtap: the host link it sits on (e.g. eth0).")
    ] = None,
    mode: Annotated[
        str | None, typer.Option(metavar="MODE", help="macvtap: bridge (default), vepa, private or passthru.")
    ] = None,
    pci_host: Annotated[
        str | None, typer.Option("--host", metavar="PCI", help="vfio: host PCI address, e.g. 0000:03:00.0.")
    ] = None,
    rebind: Annotated[
        bool, typer.Option("--rebind", help="vfio: bind the device to vfio-pci first, restore after.")
    ] = False,
    port: Annotated[
        list[str] | None, typer.Option(metavar="PROTO:HOST:GUEST", help="passt: port forward, e.g. tcp:2222:22.")
    ] = None,
    ipv4_only: Annotated[bool, typer.Option("--ipv4-only", help="passt: serve IPv4 only.")] = False,
    addr: Annotated[
        str | None, typer.Option(metavar="SLOT[.FN]", help="PCI slot[.function], hex as QEMU reads it.")
    ] = None,
    bus: Annotated[
        str | None, typer.Option(metavar="BUS", help="PCI bus id (pci.0, a pcie-root-port, a bridge).")
    ] = None,
    vectors: Annotated[int | None, typer.Option(metavar="N", help="MSI-X vectors (virtio).")] = None,
    queues: Annotated[int | None, typer.Option(metavar="N", help="Queue pairs (virtio, tap backends).")] = None,
    mtu: Annotated[
        int | None, typer.Option(metavar="N", help="MTU 68-65535 (bridge, nat, tap; default: the bridge's).")
    ] = None,
    link: Annotated[
        LinkArg | None, typer.Option(help="Initial link state (default up; a vfio NIC has none).")
    ] = None,
    filter_on: FilterOn = False,
    filter_ipv4: FilterIpv4 = None,
    filter_ipv6: FilterIpv6 = None,
    no_filter_mac: FilterNoMac = False,
    filter_dhcp_server: FilterDhcp = False,
) -> None:
    """Hot-add a NIC (atomic: on failure the guest is left as it was)."""
    # A vfio NIC is the host's function itself: it has no model and no link, and the spec's checks refuse either.
    if backend is not BackendType.vfio:
        model = model or "virtio-net-pci"
        link = link or LinkArg.up
    spec: dict[str, object] = {
        **({"model": model} if model is not None else {}),
        **({"link": link.value} if link is not None else {}),
        "backend": build_backend(
            backend, hub=hub, hostfwd=hostfwd or [], net=net, restrict=restrict,
            connect_to=connect_to, listen=listen, local=local, remote=remote,
            host=HostFlags(bridge, helper, network, ifname, pci_host, rebind, parent, mode),
            ports=port, ipv4_only=ipv4_only,
        ),
    }
    optional = {"id": nic_id, "mac": mac, "addr": addr, "bus": bus, "vectors": vectors, "queues": queues}
    optional["mtu"] = mtu
    spec |= {k: v for k, v in optional.items() if v is not None}
    nic_filter = FilterFlags(filter_on, tuple(filter_ipv4 or ()), tuple(filter_ipv6 or ()), no_filter_mac,
                             filter_dhcp_server)
    spec |= {"filter": nic_filter.build()} if nic_filter.given else {}
    from qmpnet.core.model import parse_nic_spec  # noqa: PLC0415 - see the module's imports
    from qmpnet.core.policy import check_spec  # noqa: PLC0415

    nic_spec = checked(lambda: parse_nic_spec(spec))
    nic = call.run(
        lambda guest: guest.add_nic(nic_spec, verify=call.verify),
        policy_check=lambda settings: check_spec(nic_spec, settings.policy),
    )
    call.emit(nic, lambda: nic_table([nic]) + warning_lines(nic))


@app.command("del")
@guest_options(qga=True, verify=True)
def nic_del(
    call: GuestCall,
    nic_id: NicIdArg,
    timeout: Annotated[
        float | None,
        typer.Option(metavar="SECONDS", help="Seconds to wait for the guest's ack (default: the setting)."),
    ] = None,
) -> None:
    """Hot-remove a NIC; prints 'removed', or 'removal_pending' if the guest has not acked in time.

    On a NIC whose removal is pending already, nothing is sent to QEMU again: it waits for the guest's ack.
    """
    checked(lambda: check_request("nic/del", {"id": nic_id} | ({"timeout": timeout} if timeout is not None else {})))
    result = call.run(lambda guest: guest.remove_nic(nic_id, timeout=timeout, verify=call.verify))
    call.emit(result, lambda: f"{result.id}: {result.state}")


@app.command("link")
@guest_options(qga=True, verify=True)
def nic_link(
    call: GuestCall,
    nic_id: NicIdArg,
    state: Annotated[LinkArg, typer.Argument(metavar="up|down", help="The new link state.")],
) -> None:
    """Set a NIC's link up or down."""
    checked(lambda: check_request("nic/link", {"id": nic_id, "up": state is LinkArg.up}))
    nic = call.run(lambda guest: guest.set_link(nic_id, state is LinkArg.up, verify=call.verify))
    call.emit(nic, lambda: nic_table([nic]))


@app.command("list")
@guest_options(qga=True)
def nic_list(call: GuestCall) -> None:
    """List the guest's NICs, cold-plugged ones included."""
    nics = call.run(lambda guest: guest.list_nics())
    call.emit({"nics": [n.model_dump(mode="json") for n in nics]}, lambda: nic_table(nics))


@app.command("set")
@guest_options()
def nic_set(
    call: GuestCall,
    nic_id: NicIdArg,
    bridge: Annotated[str | None, typer.Option(metavar="BRIDGE", help="Move the NIC to this host bridge.")] = None,
    network: Annotated[str | None, typer.Option(metavar="NAME", help="Move the NIC to this NAT network.")] = None,
    vlan: Annotated[
        int | None, typer.Option(metavar="VID", help="Access VLAN (untagged, PVID) on a VLAN-filtering bridge.")
    ] = None,
    trunks: Annotated[str | None, typer.Option(metavar="VIDS", help="Tagged VLANs, e.g. 10,20,100-199.")] = None,
    no_vlan: Annotated[bool, typer.Option("--no-vlan", help="Back to the bridge's default VLAN.")] = False,
    rate: Annotated[
        str | None, typer.Option(metavar="RATE", help="Rate limit both ways, tc notation (10mbit).")
    ] = None,
    burst: Annotated[str | None, typer.Option(metavar="SIZE", help="Bucket of the rate limit (32kb).")] = None,
    delay: Annotated[str | None, typer.Option(metavar="TIME", help="Delay towards the guest (100ms).")] = None,
    jitter: Annotated[str | None, typer.Option(metavar="TIME", help="Jitter of the delay (10ms).")] = None,
    loss: Annotated[str | None, typer.Option(metavar="PERCENT", help="Loss towards the guest (1%).")] = None,
    no_shape: Annotated[bool, typer.Option("--no-shape", help="Remove all shaping.")] = False,
    link: Annotated[LinkArg | None, typer.Option(help="Set the link up or down.")] = None,
    mtu: Annotated[
        int | None, typer.Option(metavar="N", help="MTU of the NIC's host tap; the guest must apply it itself.")
    ] = None,
    filter_on: FilterOn = False,
    filter_ipv4: FilterIpv4 = None,
    filter_ipv6: FilterIpv6 = None,
    no_filter_mac: FilterNoMac = False,
    filter_dhcp_server: FilterDhcp = False,
    no_filter: Annotated[bool, typer.Option("--no-filter", help="Remove the anti-spoofing filter.")] = False,
) -> None:
    """Change a NIC live, without unplugging it: move it, tag it, shape it, filter it, set its link or MTU (atomic).

    Any --filter flag replaces the NIC's whole filter, as the flags give it.
    """
    values = {"rate": rate, "burst": burst, "delay": delay, "jitter": jitter, "loss": loss}
    update = build_update(
        nic_id, bridge=bridge, network=network, vlan=vlan, trunks=trunks, no_vlan=no_vlan,
        shape={k: v for k, v in values.items() if v is not None}, no_shape=no_shape, link=link,
        nic_filter=FilterFlags(filter_on, tuple(filter_ipv4 or ()), tuple(filter_ipv6 or ()), no_filter_mac,
                               filter_dhcp_server, no_filter),
    )  # fmt: skip
    update |= {"mtu": mtu} if mtu is not None else {}
    from qmpnet.core.model import parse_nic_update  # noqa: PLC0415 - see the module's imports

    checked(lambda: parse_nic_update(update))  # bad values are refused before connecting, naming the field
    nic = call.run(lambda ops: ops.update_nic(update))
    call.emit(nic, lambda: nic_table([nic]) + backend_line(nic) + warning_lines(nic))


async def wait_for_stop(duration: float | None) -> None:
    """Wait ``duration`` seconds (``None``: for ever), or until SIGINT (Ctrl-C) or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for number in signals:
        loop.add_signal_handler(number, stop.set)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(duration):
                await stop.wait()
    finally:
        for number in signals:
            loop.remove_signal_handler(number)


@app.command("capture")
@guest_options()
def nic_capture(
    call: GuestCall,
    nic_id: NicIdArg,
    file: Annotated[Path, typer.Option("--file", metavar="FILE", help="The pcap file (written by QEMU, on its host).")],
    duration: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Seconds to capture (default: until Ctrl-C).")
    ] = None,
) -> None:
    """Capture a NIC's traffic into a pcap file (any backend) until --duration has passed or Ctrl-C."""
    if duration is not None and not duration >= 0:
        raise fail(InvalidRequest("--duration: must be zero or more seconds", field="--duration"))
    target = str(file.absolute())

    async def capture(ops: GuestOps) -> CaptureResult:
        await ops.capture(nic_id, "start", target)
        print(f"capturing NIC {nic_id} into {target}; Ctrl-C to stop", file=sys.stderr, flush=True)
        try:
            await wait_for_stop(duration)
        finally:
            stopped = await ops.capture(nic_id, "stop")
        return stopped

    result = call.run(capture)
    call.emit(result, lambda: f"{result.id}: {result.state}, {result.file}")
