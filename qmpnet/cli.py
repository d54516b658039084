"""The ``qmpnet`` command line.

Direct mode talks to one guest's QMP socket (``--qmp``). Every command prints the same objects as the MQTT API
with ``--json`` (one JSON document on stdout), or a readable table without it. Exit status: 0 on success; 1 on
an error, with one line ``error: <code>: <message>`` on stderr; 2 on a usage error (from the argument parser).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

from qmpnet.api import connect
from qmpnet.control import ControlGuest, controller_serves
from qmpnet.errors import InvalidRequest, QmpnetError
from qmpnet.settings import Settings, load_settings
from qmpnet.store import StateDir

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence

    from qmpnet.hostnet.nat import NatStatus
    from qmpnet.model import Nic
    from qmpnet.ports import GuestOps
    from qmpnet.wire.envelopes import GuestInfo

T = TypeVar("T")

app = typer.Typer(
    name="qmpnet",
    help="Change the network of running QEMU guests over QMP, without a reboot.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
nic_app = typer.Typer(help="Hot-add, remove, link and list a guest's NICs.", no_args_is_help=True)
app.add_typer(nic_app, name="nic")


class BackendType(StrEnum):
    """Backends the CLI can build from flags."""

    user = "user"
    hubport = "hubport"
    stream = "stream"
    dgram = "dgram"
    bridge = "bridge"
    nat = "nat"
    tap = "tap"
    vfio = "vfio"


class MachineArg(StrEnum):
    """Machine types of the demo guest."""

    pc = "pc"
    q35 = "q35"


class ProtocolArg(StrEnum):
    """MQTT versions for broker mode."""

    auto = "auto"
    v5 = "5"
    v311 = "3.1.1"


class LinkArg(StrEnum):
    """Link states."""

    up = "up"
    down = "down"


QmpOpt = Annotated[
    str | None, typer.Option("--qmp", help="Direct mode: the guest's QMP socket (unix path or host:port).")
]
BrokerOpt = Annotated[
    str | None, typer.Option("--broker", help="Broker mode: mqtt[s]://host:port where `qmpnet serve` listens.")
]
GuestOpt = Annotated[str | None, typer.Option("--guest", help="Broker mode: the guest's name.")]
ControllerOpt = Annotated[
    str | None, typer.Option("--controller", help="Broker mode: the controller id (default: this host's name).")
]
ProtocolOpt = Annotated[
    ProtocolArg | None,
    typer.Option(
        "--mqtt-protocol", help="Broker mode: MQTT version (default auto: 5, or 3.1.1 if the broker refuses 5)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the MQTT API's JSON object instead of a table.")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML settings file (timeouts, policy).", show_default=False)
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log what is sent to QEMU on stderr.")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Where qmpnet keeps what it knows of each guest (default: /var/lib/qmpnet, "
                 "or $QMPNET_STATE_DIR).", show_default=False),
]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``qmpnet`` console script."""
    app(args=list(argv) if argv is not None else None, prog_name="qmpnet")


def fail(err: QmpnetError) -> typer.Exit:
    """Print ``error: <code>: <message>`` on stderr and return the exit to raise."""
    print(f"error: {err.code}: {err.message}", file=sys.stderr)
    return typer.Exit(1)


@dataclass(frozen=True)
class Where:
    """The guest a command acts on: directly (``--qmp``) or through a controller (``--broker`` and ``--guest``)."""

    qmp: str | None
    broker: str | None = None
    guest: str | None = None
    controller: str | None = None
    state_dir: Path | None = None
    protocol: ProtocolArg | None = None


def broker_settings(config: Path | None, protocol: ProtocolArg | None, **overrides: Any) -> Settings:  # noqa: ANN401
    """The settings of a command: the file and environment, with ``--mqtt-protocol`` (and ``overrides``) on top."""
    if protocol is not None:
        overrides["mqtt"] = {"protocol": protocol.value}
    return load_settings(config, **overrides)


def run_on_guest(where: Where, config: Path | None, verbose: bool, op: Callable[[GuestOps], Awaitable[T]]) -> T:
    """Reach the guest ``where`` says, run ``op`` and return its result; errors become exit status 1."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not verbose:
        # qemu.qmp logs each failed connection attempt at ERROR; the command's own one line says what happened.
        logging.getLogger("qemu").setLevel(logging.CRITICAL)
    if (where.qmp is None) == (where.broker is None) or (where.broker is None) != (where.guest is None):
        raise typer.BadParameter("give --qmp SOCKET, or --broker URL and --guest NAME", param_hint="--qmp/--broker")

    async def session(settings: Settings) -> T:
        if where.qmp is not None:
            # A `qmpnet serve` on this host may hold the monitor (QEMU serves one client): then ask it instead.
            control = StateDir(settings.state_dir).control_socket
            if await controller_serves(control, where.qmp, settings.qmp.connect_timeout):
                return await op(ControlGuest(control, where.qmp, timeout=settings.mqtt.request_timeout))
            async with connect(where.qmp, settings=settings) as guest:
                return await op(guest)
        from qmpnet.client import Client  # noqa: PLC0415 - the MQTT stack is loaded only in broker mode

        async with Client(where.broker, settings=settings.mqtt) as client:
            return await op(client.guest(where.controller or settings.mqtt.controller_id, where.guest or ""))

    overrides: dict[str, Any] = {"state_dir": where.state_dir} if where.state_dir is not None else {}
    try:
        return asyncio.run(session(broker_settings(config, where.protocol, **overrides)))
    except QmpnetError as err:
        raise fail(err) from None


def emit(value: BaseModel | dict[str, Any], as_json: bool, table: Callable[[], str]) -> None:
    """Print ``value`` as JSON or as the readable ``table``."""
    if as_json:
        data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        print(json.dumps(data, indent=2))
    else:
        print(table())


def nic_table(nics: Sequence[Nic]) -> str:
    """Format NICs as a table."""
    rows = [("ID", "MODEL", "MAC", "NETDEV", "BACKEND", "PCI", "LINK", "STATE")]
    for nic in nics:
        pci = f"{nic.pci.bus}:{nic.pci.slot:02x}.{nic.pci.function}" if nic.pci else "-"
        backend = nic.backend.type if nic.backend else "-"
        rows.append((nic.id, nic.model, nic.mac or "-", nic.netdev or "-", backend, pci, nic.link, nic.state))
    return format_rows(rows)


def format_rows(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


@dataclass(frozen=True)
class HostFlags:
    """The flags of the host-side backends (bridge, nat, tap, vfio)."""

    bridge: str | None = None
    helper: bool = False
    network: str | None = None
    ifname: str | None = None
    pci_host: str | None = None
    rebind: bool = False

    def backend_options(self, backend: BackendType) -> dict[str, object]:
        """The backend object's options; a missing required flag is an ``invalid_request``."""
        if backend is BackendType.nat:
            return {"network": self.network or "default"}
        required = {BackendType.bridge: ("--bridge", self.bridge), BackendType.tap: ("--ifname", self.ifname),
                    BackendType.vfio: ("--host", self.pci_host)}[backend]
        flag, value = required
        if value is None:
            raise fail(InvalidRequest(f"{flag}: --backend {backend.value} needs {flag}", field=flag))
        if backend is BackendType.bridge:
            return {"bridge": value, "helper": self.helper}
        if backend is BackendType.tap:
            return {"ifname": value}
        return {"host": value, "rebind": self.rebind}


HOST_BACKENDS = frozenset({BackendType.bridge, BackendType.nat, BackendType.tap, BackendType.vfio})


def socket_address(value: str, flag: str) -> dict[str, object]:
    """``/path`` → unix address, ``host:port`` → inet address (for stream/dgram flags)."""
    if value.startswith("/"):
        return {"type": "unix", "path": value}
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise fail(InvalidRequest(f"{flag}: {value!r} is neither /unix/path nor host:port", field=flag))
    return {"type": "inet", "host": host, "port": int(port)}


def build_backend(
    backend: BackendType,
    *,
    hub: int | None,
    hostfwd: list[str],
    net: str | None,
    restrict: bool,
    connect_to: str | None,
    listen: str | None,
    local: str | None,
    remote: str | None,
    host: HostFlags,
) -> dict[str, object]:
    """Turn the backend flags into the MQTT API's backend object."""
    spec: dict[str, object] = {"type": backend.value}
    if backend in HOST_BACKENDS:
        return spec | host.backend_options(backend)
    if backend is BackendType.user:
        spec |= {"hostfwd": hostfwd, "restrict": restrict} | ({"net": net} if net else {})
    elif backend is BackendType.hubport:
        spec["hub"] = 0 if hub is None else hub
    elif backend is BackendType.stream:
        if (listen is None) == (connect_to is None):
            raise fail(InvalidRequest("--listen or --connect: give exactly one for a stream backend", field="--listen"))
        spec |= {"server": listen is not None}
        spec["addr"] = socket_address(listen or connect_to or "", "--listen" if listen else "--connect")
    else:
        if local is None and remote is None:
            raise fail(InvalidRequest("--local/--remote: a dgram backend needs at least one", field="--local"))
        if local is not None:
            spec["local"] = socket_address(local, "--local")
        if remote is not None:
            spec["remote"] = socket_address(remote, "--remote")
    return spec


@nic_app.command("add")
def nic_add(
    model: Annotated[str, typer.Option(help="rtl8139, e1000, e1000e, virtio-net-pci (or virtio).")] = "virtio-net-pci",
    nic_id: Annotated[str | None, typer.Option("--id", help="Device id (generated when absent).")] = None,
    mac: Annotated[str | None, typer.Option(help="MAC address (a free 52:54:00:xx:xx:xx when absent).")] = None,
    backend: Annotated[BackendType, typer.Option(help="Backend type.")] = BackendType.user,
    hub: Annotated[int | None, typer.Option(help="Hub number for --backend hubport (the old vlan=n).")] = None,
    hostfwd: Annotated[list[str] | None, typer.Option(help="user: port forward, e.g. tcp:127.0.0.1:2222-:22.")] = None,
    net: Annotated[str | None, typer.Option(help="user: guest network, e.g. 10.0.3.0/24.")] = None,
    restrict: Annotated[bool, typer.Option(help="user: isolate the guest from the host.")] = False,
    listen: Annotated[str | None, typer.Option(help="stream: listen on /path or host:port.")] = None,
    connect_to: Annotated[str | None, typer.Option("--connect", help="stream: connect to /path or host:port.")] = None,
    local: Annotated[str | None, typer.Option(help="dgram: local /path or host:port.")] = None,
    remote: Annotated[str | None, typer.Option(help="dgram: remote /path or host:port.")] = None,
    bridge: Annotated[str | None, typer.Option(help="bridge: the host bridge (e.g. br0).")] = None,
    helper: Annotated[bool, typer.Option(help="bridge: let QEMU's bridge helper make the tap (policy).")] = False,
    network: Annotated[str | None, typer.Option(help="nat: the NAT network (default: default).")] = None,
    ifname: Annotated[str | None, typer.Option(help="tap: an existing tap device.")] = None,
    pci_host: Annotated[str | None, typer.Option("--host", help="vfio: host PCI address, e.g. 0000:03:00.0.")] = None,
    rebind: Annotated[bool, typer.Option(help="vfio: bind the device to vfio-pci first, restore after.")] = False,
    addr: Annotated[str | None, typer.Option(help="PCI slot[.function], hex as QEMU reads it.")] = None,
    bus: Annotated[str | None, typer.Option(help="PCI bus id (pci.0, a pcie-root-port, a bridge).")] = None,
    vectors: Annotated[int | None, typer.Option(help="MSI-X vectors (virtio).")] = None,
    queues: Annotated[int | None, typer.Option(help="Queue pairs (virtio, tap backends).")] = None,
    link: Annotated[LinkArg, typer.Option(help="Initial link state.")] = LinkArg.up,
    qmp: QmpOpt = None,
    broker: BrokerOpt = None,
    guest: GuestOpt = None,
    controller: ControllerOpt = None,
    mqtt_protocol: ProtocolOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Hot-add a NIC (atomic: on failure the guest is left as it was)."""
    spec: dict[str, object] = {
        "model": model,
        "link": link.value,
        "backend": build_backend(
            backend, hub=hub, hostfwd=hostfwd or [], net=net, restrict=restrict,
            connect_to=connect_to, listen=listen, local=local, remote=remote,
            host=HostFlags(bridge, helper, network, ifname, pci_host, rebind),
        ),
    }
    optional = {"id": nic_id, "mac": mac, "addr": addr, "bus": bus, "vectors": vectors, "queues": queues}
    spec |= {k: v for k, v in optional.items() if v is not None}
    where = Where(qmp, broker, guest, controller, state_dir, mqtt_protocol)
    nic = run_on_guest(where, config, verbose, lambda guest: guest.add_nic(spec))
    emit(nic, as_json, lambda: nic_table([nic]))


@nic_app.command("del")
def nic_del(
    nic_id: Annotated[str, typer.Argument(metavar="ID", help="The NIC's id.")],
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for the guest's ack (default: setting).", show_default=False)
    ] = None,
    qmp: QmpOpt = None,
    broker: BrokerOpt = None,
    guest: GuestOpt = None,
    controller: ControllerOpt = None,
    mqtt_protocol: ProtocolOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Hot-remove a NIC; prints 'removed', or 'removal_pending' if the guest has not acked in time."""
    where = Where(qmp, broker, guest, controller, state_dir, mqtt_protocol)
    result = run_on_guest(where, config, verbose, lambda guest: guest.remove_nic(nic_id, timeout=timeout))
    emit(result, as_json, lambda: f"{result.id}: {result.state}")


@nic_app.command("link")
def nic_link(
    nic_id: Annotated[str, typer.Argument(metavar="ID", help="The NIC's id.")],
    state: Annotated[LinkArg, typer.Argument(metavar="up|down", help="The new link state.")],
    qmp: QmpOpt = None,
    broker: BrokerOpt = None,
    guest: GuestOpt = None,
    controller: ControllerOpt = None,
    mqtt_protocol: ProtocolOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Set a NIC's link up or down."""
    where = Where(qmp, broker, guest, controller, state_dir, mqtt_protocol)
    nic = run_on_guest(where, config, verbose, lambda guest: guest.set_link(nic_id, state is LinkArg.up))
    emit(nic, as_json, lambda: nic_table([nic]))


@nic_app.command("list")
def nic_list(
    qmp: QmpOpt = None,
    broker: BrokerOpt = None,
    guest: GuestOpt = None,
    controller: ControllerOpt = None,
    mqtt_protocol: ProtocolOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """List the guest's NICs, cold-plugged ones included."""
    where = Where(qmp, broker, guest, controller, state_dir, mqtt_protocol)
    nics = run_on_guest(where, config, verbose, lambda guest: guest.list_nics())
    emit({"nics": [n.model_dump(mode="json") for n in nics]}, as_json, lambda: nic_table(nics))


@app.command("models")
def models(
    qmp: QmpOpt = None,
    broker: BrokerOpt = None,
    guest: GuestOpt = None,
    controller: ControllerOpt = None,
    mqtt_protocol: ProtocolOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """List the NIC models this QEMU offers (the old -net nic,model=?)."""
    where = Where(qmp, broker, guest, controller, state_dir, mqtt_protocol)
    found = run_on_guest(where, config, verbose, lambda guest: guest.models())

    def table() -> str:
        rows = [("MODEL", "BUS", "SPEED", "HOTPLUG", "DESCRIPTION")]
        rows += [(m.name, m.bus, m.speed or "-", "yes" if m.hotplug else "no", m.description) for m in found]
        return format_rows(rows)

    emit({"models": [m.model_dump(mode="json") for m in found]}, as_json, table)


@app.command("apply")
def apply_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="TOML or JSON: `nics` = NICs in the NicSpec shape, "
                                         "each with an id; optional `generation`, `prune`.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and change nothing.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Also remove NICs qmpnet created, not in FILE.")] = False,
    qmp: QmpOpt = None,
    broker: BrokerOpt = None,
    guest: GuestOpt = None,
    controller: ControllerOpt = None,
    mqtt_protocol: ProtocolOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Converge a guest to the NICs FILE declares: add what is missing, set links, keep the rest (idempotent)."""
    from qmpnet.apply import apply_desired  # noqa: PLC0415 - only this command needs it
    from qmpnet.reconcile import parse_desired  # noqa: PLC0415 - only this command needs it

    try:
        desired = parse_desired(read_document(file), source="apply")
    except QmpnetError as err:
        raise fail(err) from None
    if prune:
        desired = desired.model_copy(update={"prune": True})
    where = Where(qmp, broker, guest, controller, state_dir, mqtt_protocol)
    report = run_on_guest(where, config, verbose, lambda target: apply_desired(target, desired, dry_run=dry_run))

    def table() -> str:
        rows = [("ACTION", "ID", "DETAIL")]
        failed = {e.id: e for e in report.errors}
        for change in report.plan:
            detail = change.link or change.reason or ""
            if change.id in failed and change.action != "conflict":
                detail = f"failed: {failed[change.id].code}: {failed[change.id].message}"
            elif change.id in report.pending:
                detail = "removal pending: the guest has not acked yet"
            rows.append((change.action, change.id, detail))
        verdict = "dry run: nothing was changed" if dry_run else ("converged" if report.converged else "not converged")
        return f"{format_rows(rows)}\n{verdict}"

    emit(report.model_dump(mode="json") | {"converged": report.converged}, as_json, table)
    if report.errors:
        first = report.errors[0]
        print(f"error: {first.code}: {len(report.errors)} of {len(report.plan)} NICs did not converge "
              f"(first: {first.id}: {first.message})", file=sys.stderr)
        raise typer.Exit(1)


def read_document(path: Path) -> dict[str, Any]:
    """A desired-state file as a dict: TOML (``.toml``) or JSON.

    Raises:
        InvalidRequest: The file cannot be read or parsed, or is not a table/object.
    """
    import tomllib  # noqa: PLC0415 - only apply reads TOML documents

    try:
        text = path.read_text()
    except OSError as err:
        raise InvalidRequest(f"FILE: cannot read {path}: {err.strerror or err}", field="FILE") from err
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise InvalidRequest(f"FILE: {path} is not valid {kind}: {err}", field="FILE") from err
    if not isinstance(data, dict):
        raise InvalidRequest(f"FILE: {path} must hold an object with `nics`", field="FILE")
    return data


@app.command("guests")
def guests(
    broker: Annotated[str, typer.Option("--broker", help="mqtt[s]://host:port where `qmpnet serve` listens.")],
    controller: ControllerOpt = None,
    mqtt_protocol: ProtocolOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """List the guests a controller serves, with their connection state."""
    from qmpnet.client import Client  # noqa: PLC0415 - the MQTT stack is loaded only in broker mode

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")

    async def session(settings: Settings) -> list[GuestInfo]:
        async with Client(broker, settings=settings.mqtt) as client:
            return await client.guests(controller or settings.mqtt.controller_id)

    try:
        found = asyncio.run(session(broker_settings(config, mqtt_protocol)))
    except QmpnetError as err:
        raise fail(err) from None

    def table() -> str:
        rows = [("NAME", "STATE", "QEMU", "MACHINE", "SINCE")]
        for g in found:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g.since))
            rows.append((g.name, g.state, g.qemu or "-", g.machine or "-", since))
        return format_rows(rows)

    emit({"guests": [g.model_dump(mode="json") for g in found]}, as_json, table)


@app.command("schema")
def schema(
    markdown: Annotated[bool, typer.Option(help="Print the field reference of docs/mqtt-api.md instead.")] = False,
) -> None:
    """Print the JSON Schema of every MQTT request, response, retained state and event."""
    from qmpnet.schema import api_schema, render_reference  # noqa: PLC0415 - only this command needs it

    print(render_reference() if markdown else json.dumps(api_schema(), indent=2), end="" if markdown else "\n")


@app.command("serve")
def serve(
    config: ConfigOpt = None,
    broker: Annotated[str | None, typer.Option(help="mqtt://host:port, or mqtts://host:port for TLS.")] = None,
    controller_id: Annotated[str | None, typer.Option(help="This controller's id (default: host name).")] = None,
    guest: Annotated[list[str] | None, typer.Option(help="NAME=QMP_SOCKET; repeatable.")] = None,
    guest_dir: Annotated[Path | None, typer.Option(help="Serve every *.qmp socket in DIR, named by its stem.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on 127.0.0.1:PORT.")] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json.")] = None,
    mqtt_protocol: Annotated[
        ProtocolArg | None, typer.Option(help="MQTT version (default auto: 5, or 3.1.1 if the broker refuses 5).")
    ] = None,
    verbose: VerboseOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Run the MQTT-driven controller for a fleet of guests (see docs/mqtt-api.md)."""
    from qmpnet.app import main as serve_main  # noqa: PLC0415 - the MQTT stack is loaded only for serve

    raise typer.Exit(
        serve_main(
            config, broker=broker, controller_id=controller_id, guests=guest, guest_dir=guest_dir,
            metrics_port=metrics_port, log_format=log_format, log_level="debug" if verbose else None,
            state_dir=state_dir, mqtt_protocol=mqtt_protocol.value if mqtt_protocol is not None else None,
        )
    )


@app.command("demo")
def demo(
    machine: Annotated[MachineArg, typer.Option(help="Machine type of the demo guest.")] = MachineArg.pc,
    verbose: VerboseOpt = False,
) -> None:
    """Boot the test guest, hot-plug each NIC model and show what the guest saw."""
    from qmpnet.demo import run_demo  # noqa: PLC0415 - the demo pulls in the guest builder only when asked for

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        ok = asyncio.run(run_demo("q35" if machine is MachineArg.q35 else "pc"))
    except QmpnetError as err:
        raise fail(err) from None
    raise typer.Exit(0 if ok else 1)


net_app = typer.Typer(help="Bring the NAT networks of the settings up and down.", no_args_is_help=True)
app.add_typer(net_app, name="net")
NetNameArg = Annotated[str, typer.Argument(metavar="NAME", help="A NAT network from the settings (e.g. default).")]


def run_on_host(config: Path | None, verbose: bool, op: Callable[[Settings], Coroutine[Any, Any, T]]) -> T:
    """Run host-side ``op`` with the settings; errors become exit status 1."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return asyncio.run(op(load_settings(config)))
    except QmpnetError as err:
        raise fail(err) from None


@net_app.command("up")
def net_up_cmd(
    name: NetNameArg, as_json: JsonOpt = False, config: ConfigOpt = None, verbose: VerboseOpt = False
) -> None:
    """Bring a NAT network up: bridge with the gateway address, masquerade, DHCP/DNS (idempotent)."""
    from qmpnet.hostnet import net_up  # noqa: PLC0415 - host tooling only when asked for

    async def up(settings: Settings) -> NatStatus:
        hostnet = settings.hostnet
        return await net_up(hostnet.network(name, field="name"), netns=hostnet.netns, settings=hostnet)

    status = run_on_host(config, verbose, up)
    emit(status, as_json, lambda: nat_table([status]))


@net_app.command("down")
def net_down_cmd(name: NetNameArg, config: ConfigOpt = None, verbose: VerboseOpt = False) -> None:
    """Take a NAT network down: its dnsmasq, nftables table and bridge are removed."""
    from qmpnet.hostnet import net_down  # noqa: PLC0415 - host tooling only when asked for

    async def down(settings: Settings) -> bool:
        hostnet = settings.hostnet
        return await net_down(hostnet.network(name, field="name"), netns=hostnet.netns, settings=hostnet)

    removed = run_on_host(config, verbose, down)
    print(f"{name}: {'down' if removed else 'was not up'}")


@net_app.command("list")
def net_list_cmd(as_json: JsonOpt = False, config: ConfigOpt = None, verbose: VerboseOpt = False) -> None:
    """List the NAT networks of the settings and whether each is up."""
    from qmpnet.hostnet import net_list  # noqa: PLC0415 - host tooling only when asked for

    async def listing(settings: Settings) -> list[NatStatus]:
        return await net_list(netns=settings.hostnet.netns, settings=settings.hostnet)

    found = run_on_host(config, verbose, listing)
    emit({"networks": [s.model_dump(mode="json") for s in found]}, as_json, lambda: nat_table(found))


def nat_table(found: Sequence[NatStatus]) -> str:
    """Format NAT network states as a table."""
    rows = [("NAME", "BRIDGE", "SUBNET", "UP", "DNSMASQ", "LEASES")]
    rows += [
        (s.name, s.bridge, str(s.subnet), "yes" if s.up else "no", str(s.dnsmasq_pid or "-"), str(len(s.leases)))
        for s in found
    ]
    return format_rows(rows)
