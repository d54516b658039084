"""The ``qmpnet`` command line.

Direct mode talks to one guest's QMP socket (``--qmp``). Every command prints the same objects as the MQTT API
with ``--json`` (one JSON document on stdout), or a readable table without it. Exit status: 0 on success; 1 on
an error, with one line ``error: <code>: <message>`` on stderr; 2 on a usage error (from the argument parser),
also one line, ``error: invalid_request: <what>``. Input is checked before anything is connected to, as the MQTT
API checks it. Logs of the libraries underneath (qemu.qmp, paho) show only with ``--verbose``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from qmpnet.errors import InvalidRequest, QmpnetError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence

    from pydantic import BaseModel

    from qmpnet.hostnet.nat import NatStatus
    from qmpnet.model import CaptureResult, Nic, Verify
    from qmpnet.ports import GuestOps
    from qmpnet.settings import Settings
    from qmpnet.wire.envelopes import GuestInfo

# Every qmpnet module but the errors is imported inside the function that needs it, so that `qmpnet --help` and a
# direct-mode `nic add` load only what they use (the import-time budget is in docs/performance.md).

T = TypeVar("T")

log = logging.getLogger(__name__)

# Plain help (click's layout): the rich panels print a type such as <bool> next to every flag.
app = typer.Typer(
    name="qmpnet",
    help="Change the network of running QEMU guests over QMP, without a reboot.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
nic_app = typer.Typer(
    help="Hot-add, remove, link and list a guest's NICs.", no_args_is_help=True, rich_markup_mode=None
)
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
    str | None,
    typer.Option("--qmp", metavar="SOCKET", help="Direct mode: the guest's QMP socket (unix path or host:port)."),
]
BrokerOpt = Annotated[
    str | None,
    typer.Option("--broker", metavar="URL", help="Broker mode: mqtt[s]://host:port where `qmpnet serve` listens."),
]
GuestOpt = Annotated[str | None, typer.Option("--guest", metavar="NAME", help="Broker mode: the guest's name.")]
ProtocolOpt = Annotated[
    ProtocolArg | None,
    typer.Option(
        "--mqtt-protocol", help="Broker mode: MQTT version (default auto: 5, or 3.1.1 if the broker refuses 5)."
    ),
]
ControllerOpt = Annotated[
    str | None,
    typer.Option("--controller", metavar="ID", help="Broker mode: the controller id (default: this host's name)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the MQTT API's JSON object instead of a table.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", metavar="FILE", help="TOML settings file (timeouts, policy).", show_default=False),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log what is sent to QEMU on stderr.")]
QgaOpt = Annotated[
    str | None,
    typer.Option("--qga", metavar="SOCKET", show_default=False,
                 help="Direct mode: the guest agent's socket (found through QMP when not given)."),
]
VerifyOpt = Annotated[
    bool, typer.Option("--verify", help="Wait until the guest itself shows the change (needs its guest agent).")
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", metavar="DIR", help="Where qmpnet keeps what it knows of each guest (default: "
                 "/var/lib/qmpnet, or $QMPNET_STATE_DIR).", show_default=False),
]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``qmpnet`` console script; exits with the command's status.

    A usage error (unknown option, bad choice, missing argument) is one line on stderr and exit status 2.
    """
    global _COLLECTOR_PAUSED  # noqa: PLW0603 - one process-wide switch, set once per command
    if argv is None and gc.isenabled():
        # A command's start builds hundreds of thousands of objects (pydantic models and their schemas) and frees
        # almost none: the cyclic collector would walk them again and again, for nothing. It is off until the
        # command has imported what it needs (started()), and what exists by then stays out of later collections
        # (docs/performance.md).
        gc.disable()
        _COLLECTOR_PAUSED = True
    command = typer.main.get_command(app)
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        status = command.main(args=args, prog_name="qmpnet", standalone_mode=False)
    except typer.TyperException as err:  # the argument parser's errors (typer >= 0.28 vendors click's)
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError":  # a group without its command: the help (as typer tells it)
            print(err.format_message(), file=sys.stderr)
        else:
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            message = one_line(err.format_message()).replace("Value error, ", "")
            print(f"error: invalid_request: {message}{hint}", file=sys.stderr)
        status = err.exit_code
    except typer.Abort:
        print("error: internal: aborted", file=sys.stderr)
        status = 1
    finally:
        started()
    sys.exit(status if isinstance(status, int) else 0)


def one_line(text: str) -> str:
    """``text`` with its line breaks turned into spaces, for the one stderr line of an error."""
    return " ".join(text.split())


def fail(err: QmpnetError) -> typer.Exit:
    """Print ``error: <code>: <message>`` on stderr and return the exit to raise."""
    print(f"error: {err.code}: {one_line(err.message)}", file=sys.stderr)
    return typer.Exit(1)


def checked(check: Callable[[], T]) -> T:
    """``check()``'s result; an input error it raises becomes the one-line ``error:`` exit, before any connection."""
    try:
        return check()
    except QmpnetError as err:
        raise fail(err) from None


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to its end; a qmpnet error, or any other (a bug), becomes the one-line ``error:`` exit."""
    started()
    try:
        return asyncio.run(work)
    except QmpnetError as err:
        raise fail(err) from None
    except Exception as err:
        log.debug("the command failed", exc_info=True)
        raise fail(QmpnetError(f"{type(err).__name__}: {err} (--verbose shows where)")) from None


async def _controller_serves(control: Path, address: str, timeout: float) -> bool:
    from qmpnet.control import controller_serves  # noqa: PLC0415 - only with a controller on this host

    return await controller_serves(control, address, timeout)


_COLLECTOR_PAUSED = False


def started() -> None:
    """The command has loaded what it needs: collect garbage again, leaving out everything made so far."""
    global _COLLECTOR_PAUSED  # noqa: PLW0603 - one process-wide switch, set once per command
    if _COLLECTOR_PAUSED:
        _COLLECTOR_PAUSED = False
        gc.freeze()
        gc.enable()


def setup_logging(verbose: bool) -> None:
    """Warnings as ``warning: ...`` lines; with ``--verbose`` everything, the libraries' debug output included."""
    from qmpnet.logconfig import configure as configure_logging  # noqa: PLC0415 - see the module's imports

    if verbose:
        configure_logging(logging.DEBUG, "text")
    else:
        configure_logging(logging.WARNING, "cli")


def show_version(value: bool) -> None:
    """``--version``: print ``qmpnet <version>`` and exit."""
    if value:
        from qmpnet import __version__  # noqa: PLC0415 - the package's __init__ imports the API this module uses

        print(f"qmpnet {__version__}")
        raise typer.Exit


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=show_version)
    ] = False,
) -> None:
    """Change the network of running QEMU guests over QMP, without a reboot."""


@dataclass(frozen=True)
class Where:
    """The guest a command acts on: directly (``--qmp``) or through a controller (``--broker`` and ``--guest``)."""

    qmp: str | None
    broker: str | None = None
    guest: str | None = None
    controller: str | None = None
    state_dir: Path | None = None
    qga: str | None = None
    protocol: ProtocolArg | None = None


def run_on_guest(
    where: Where,
    config: Path | None,
    verbose: bool,
    op: Callable[[GuestOps], Awaitable[T]],
    *,
    policy_check: Callable[[Settings], None] | None = None,
) -> T:
    """Reach the guest ``where`` says, run ``op`` and return its result; errors become exit status 1.

    ``policy_check`` runs in direct mode, before connecting (in broker mode the controller's policy applies).
    """
    setup_logging(verbose)
    if (where.qmp is None) == (where.broker is None) or (where.broker is None) != (where.guest is None):
        raise typer.BadParameter("give --qmp SOCKET, or --broker URL and --guest NAME", param_hint="--qmp/--broker")
    from qmpnet.settings import load_settings  # noqa: PLC0415 - see the module's imports

    overrides: dict[str, Any] = {"state_dir": where.state_dir} if where.state_dir is not None else {}
    if where.protocol is not None:
        overrides["mqtt"] = {"protocol": where.protocol.value}
    settings = checked(lambda: load_settings(config, **overrides))
    if policy_check is not None and where.qmp is not None:
        checked(lambda: policy_check(settings))

    async def session() -> T:
        if where.qmp is not None:
            # A `qmpnet serve` on this host may hold the monitor (QEMU serves one client): then ask it instead.
            control = settings.state_dir / "control.sock"
            if control.is_socket() and await _controller_serves(control, where.qmp, settings.qmp.connect_timeout):
                from qmpnet.control import ControlGuest  # noqa: PLC0415 - only with a controller on this host

                timeouts = {"timeout": settings.mqtt.request_timeout, "verify_timeout": settings.qga.verify_timeout}
                return await op(ControlGuest(control, where.qmp, **timeouts))
            from qmpnet.api import connect  # noqa: PLC0415 - see the module's imports

            async with connect(where.qmp, settings=settings, qga=where.qga) as guest:
                return await op(guest)
        from qmpnet.client import Client  # noqa: PLC0415 - the MQTT stack is loaded only in broker mode

        async with Client(where.broker, settings=settings.mqtt) as client:
            return await op(client.guest(where.controller or settings.mqtt.controller_id, where.guest or ""))

    return run(session())


def check_request(op: str, arguments: dict[str, object]) -> None:
    """Check a NIC's id and the other arguments as the MQTT API checks its request ``op``.

    Raises:
        InvalidRequest: Names the field (``id``, ``timeout``) and says why.
    """
    from qmpnet.names import check_qemu_id  # noqa: PLC0415 - see the module's imports
    from qmpnet.wire.envelopes import parse_request  # noqa: PLC0415

    nic_id = arguments.get("id")
    if isinstance(nic_id, str):
        try:
            check_qemu_id(nic_id)
        except ValueError as err:
            raise InvalidRequest(f"id: {err}", field="id") from err
    parse_request(op, "guest", arguments)


def emit(value: BaseModel | dict[str, Any], as_json: bool, table: Callable[[], str]) -> None:
    """Print ``value`` as JSON or as the readable ``table``."""
    if as_json:
        data = value if isinstance(value, dict) else value.model_dump(mode="json")
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
    pci_host: Annotated[
        str | None, typer.Option("--host", metavar="PCI", help="vfio: host PCI address, e.g. 0000:03:00.0.")
    ] = None,
    rebind: Annotated[
        bool, typer.Option("--rebind", help="vfio: bind the device to vfio-pci first, restore after.")
    ] = False,
    addr: Annotated[
        str | None, typer.Option(metavar="SLOT[.FN]", help="PCI slot[.function], hex as QEMU reads it.")
    ] = None,
    bus: Annotated[
        str | None, typer.Option(metavar="BUS", help="PCI bus id (pci.0, a pcie-root-port, a bridge).")
    ] = None,
    vectors: Annotated[int | None, typer.Option(metavar="N", help="MSI-X vectors (virtio).")] = None,
    queues: Annotated[int | None, typer.Option(metavar="N", help="Queue pairs (virtio, tap backends).")] = None,
    link: Annotated[
        LinkArg | None, typer.Option(help="Initial link state (default up; a vfio NIC has none).")
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
    qga: QgaOpt = None,
    verify: VerifyOpt = False,
    verify_address: Annotated[
        bool, typer.Option("--verify-address", help="As --verify, and wait for an address too.")
    ] = False,
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
            host=HostFlags(bridge, helper, network, ifname, pci_host, rebind),
        ),
    }
    optional = {"id": nic_id, "mac": mac, "addr": addr, "bus": bus, "vectors": vectors, "queues": queues}
    spec |= {k: v for k, v in optional.items() if v is not None}
    from qmpnet.model import parse_nic_spec  # noqa: PLC0415 - see the module's imports
    from qmpnet.policy import check_spec  # noqa: PLC0415

    nic_spec = checked(lambda: parse_nic_spec(spec))
    where = Where(qmp, broker, guest, controller, state_dir, qga, protocol=mqtt_protocol)
    mode: Verify = "address" if verify_address else verify
    nic = run_on_guest(
        where, config, verbose, lambda guest: guest.add_nic(nic_spec, verify=mode),
        policy_check=lambda settings: check_spec(nic_spec, settings.policy),
    )
    emit(nic, as_json, lambda: nic_table([nic]))


@nic_app.command("del")
def nic_del(
    nic_id: Annotated[str, typer.Argument(metavar="ID", help="The NIC's id.")],
    timeout: Annotated[
        float | None,
        typer.Option(metavar="SECONDS", help="Seconds to wait for the guest's ack (default: the setting)."),
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
    qga: QgaOpt = None,
    verify: VerifyOpt = False,
) -> None:
    """Hot-remove a NIC; prints 'removed', or 'removal_pending' if the guest has not acked in time."""
    checked(lambda: check_request("nic/del", {"id": nic_id} | ({"timeout": timeout} if timeout is not None else {})))
    where = Where(qmp, broker, guest, controller, state_dir, qga, protocol=mqtt_protocol)
    result = run_on_guest(
        where, config, verbose, lambda guest: guest.remove_nic(nic_id, timeout=timeout, verify=verify)
    )
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
    qga: QgaOpt = None,
    verify: VerifyOpt = False,
) -> None:
    """Set a NIC's link up or down."""
    checked(lambda: check_request("nic/link", {"id": nic_id, "up": state is LinkArg.up}))
    where = Where(qmp, broker, guest, controller, state_dir, qga, protocol=mqtt_protocol)
    nic = run_on_guest(where, config, verbose, lambda guest: guest.set_link(nic_id, state is LinkArg.up, verify=verify))
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
    qga: QgaOpt = None,
) -> None:
    """List the guest's NICs, cold-plugged ones included."""
    where = Where(qmp, broker, guest, controller, state_dir, qga, protocol=mqtt_protocol)
    nics = run_on_guest(where, config, verbose, lambda guest: guest.list_nics())
    emit({"nics": [n.model_dump(mode="json") for n in nics]}, as_json, lambda: nic_table(nics))


def build_update(
    nic_id: str,
    *,
    bridge: str | None,
    network: str | None,
    vlan: int | None,
    trunks: str | None,
    no_vlan: bool,
    shape: dict[str, str],
    no_shape: bool,
    link: LinkArg | None,
) -> dict[str, object]:
    """Turn the flags of ``nic set`` into the MQTT API's update object; conflicting flags are ``invalid_request``."""
    exclusive = (("--bridge", bridge, "--network", network), ("--vlan", vlan, "--trunks", trunks),
                 ("--vlan", vlan, "--no-vlan", no_vlan or None), ("--trunks", trunks, "--no-vlan", no_vlan or None),
                 ("--no-shape", no_shape or None, f"--{next(iter(shape), '')}", shape or None))  # fmt: skip
    for one, first, other, second in exclusive:
        if first is not None and second is not None:
            raise fail(InvalidRequest(f"{one}/{other}: give one of them", field=one))
    update: dict[str, object] = {"id": nic_id}
    if bridge is not None or network is not None:
        update["backend"] = {"type": "bridge", "bridge": bridge} if bridge else {"type": "nat", "network": network}
    if vlan is not None or trunks is not None or no_vlan:
        update["vlan"] = _vlan_flags(vlan, trunks)
    if shape or no_shape:
        update["shape"] = shape or None
    if link is not None:
        update["link"] = link.value
    return update


def _vlan_flags(vlan: int | None, trunks: str | None) -> dict[str, object] | None:
    if vlan is not None:
        return {"access": vlan}
    if trunks is not None:
        return {"trunks": [part.strip() for part in trunks.split(",")]}
    return None


def backend_line(nic: Nic) -> str:
    """``backend: bridge bridge=br1 tap=vnet0 rate=5mbit``, under a NIC's table row."""
    if nic.backend is None:
        return ""
    options = " ".join(f"{key}={value}" for key, value in nic.backend.options.items())
    return f"\nbackend: {nic.backend.type} {options}".rstrip()


@nic_app.command("set")
def nic_set(
    nic_id: Annotated[str, typer.Argument(metavar="ID", help="The NIC's id.")],
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
    """Change a NIC live, without unplugging it: move it, tag it, shape it, set its link (atomic)."""
    values = {"rate": rate, "burst": burst, "delay": delay, "jitter": jitter, "loss": loss}
    update = build_update(
        nic_id, bridge=bridge, network=network, vlan=vlan, trunks=trunks, no_vlan=no_vlan,
        shape={k: v for k, v in values.items() if v is not None}, no_shape=no_shape, link=link,
    )  # fmt: skip
    from qmpnet.model import parse_nic_update  # noqa: PLC0415 - see the module's imports

    try:
        parse_nic_update(update)  # bad values are refused before connecting, naming the field
    except QmpnetError as err:
        raise fail(err) from None
    where = Where(qmp, broker, guest, controller, state_dir, protocol=mqtt_protocol)
    nic = run_on_guest(where, config, verbose, lambda ops: ops.update_nic(update))
    emit(nic, as_json, lambda: nic_table([nic]) + backend_line(nic))


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


@nic_app.command("capture")
def nic_capture(
    nic_id: Annotated[str, typer.Argument(metavar="ID", help="The NIC's id.")],
    file: Annotated[Path, typer.Option("--file", metavar="FILE", help="The pcap file (written by QEMU, on its host).")],
    duration: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Seconds to capture (default: until Ctrl-C).")
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

    where = Where(qmp, broker, guest, controller, state_dir, protocol=mqtt_protocol)
    result = run_on_guest(where, config, verbose, capture)
    emit(result, as_json, lambda: f"{result.id}: {result.state}, {result.file}")


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
    where = Where(qmp, broker, guest, controller, state_dir, protocol=mqtt_protocol)
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
    where = Where(qmp, broker, guest, controller, state_dir, protocol=mqtt_protocol)
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
    broker: Annotated[
        str, typer.Option("--broker", metavar="URL", help="mqtt[s]://host:port where `qmpnet serve` listens.")
    ],
    controller: ControllerOpt = None,
    mqtt_protocol: ProtocolOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """List the guests a controller serves, with their connection state."""
    from qmpnet.client import Client  # noqa: PLC0415 - the MQTT stack is loaded only in broker mode
    from qmpnet.settings import load_settings  # noqa: PLC0415

    setup_logging(verbose)
    protocol = {"mqtt": {"protocol": mqtt_protocol.value}} if mqtt_protocol is not None else {}
    settings = checked(lambda: load_settings(config, **protocol))

    async def session() -> list[GuestInfo]:
        async with Client(broker, settings=settings.mqtt) as client:
            return await client.guests(controller or settings.mqtt.controller_id)

    found = run(session())

    def table() -> str:
        rows = [("NAME", "STATE", "QEMU", "MACHINE", "SINCE")]
        for g in found:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g.since))
            rows.append((g.name, g.state, g.qemu or "-", g.machine or "-", since))
        return format_rows(rows)

    emit({"guests": [g.model_dump(mode="json") for g in found]}, as_json, table)


@app.command("schema")
def schema(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the field reference of docs/mqtt-api.md instead.")
    ] = False,
) -> None:
    """Print the JSON Schema of every MQTT request, response, retained state and event."""
    from qmpnet.schema import api_schema, render_reference  # noqa: PLC0415 - only this command needs it

    print(render_reference() if markdown else json.dumps(api_schema(), indent=2), end="" if markdown else "\n")


@app.command("serve")
def serve(
    config: ConfigOpt = None,
    broker: Annotated[
        str | None, typer.Option(metavar="URL", help="mqtt://host:port, or mqtts://host:port for TLS.")
    ] = None,
    controller_id: Annotated[
        str | None, typer.Option(metavar="ID", help="This controller's id (default: host name).")
    ] = None,
    guest: Annotated[list[str] | None, typer.Option(metavar="NAME=SOCKET", help="NAME=QMP_SOCKET; repeatable.")] = None,
    guest_dir: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Serve every *.qmp socket in DIR, named by its stem.")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(metavar="PORT", help="Serve Prometheus metrics on 127.0.0.1:PORT.")
    ] = None,
    log_format: Annotated[str | None, typer.Option(metavar="text|json", help="text or json.")] = None,
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

    setup_logging(verbose)
    ok = run(run_demo("q35" if machine is MachineArg.q35 else "pc"))
    raise typer.Exit(0 if ok else 1)


net_app = typer.Typer(
    help="Bring the NAT networks of the settings up and down.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(net_app, name="net")
NetNameArg = Annotated[str, typer.Argument(metavar="NAME", help="A NAT network from the settings (e.g. default).")]


def run_on_host(config: Path | None, verbose: bool, op: Callable[[Settings], Coroutine[Any, Any, T]]) -> T:
    """Run host-side ``op`` with the settings; errors become exit status 1."""
    from qmpnet.settings import load_settings  # noqa: PLC0415 - see the module's imports

    setup_logging(verbose)
    settings = checked(lambda: load_settings(config))
    return run(op(settings))


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
