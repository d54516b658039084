"""How a command reaches what it acts on: one guest, or the host's NAT networks.

A guest directly, through a local controller, or over MQTT. Settings and logging are set up here, and input is
checked before anything is connected to.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import typer

from qmpnet.cli.exits import checked, run
from qmpnet.cli.output import emit
from qmpnet.errors import InvalidRequest

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from enum import StrEnum
    from pathlib import Path

    from pydantic import BaseModel

    from qmpnet.core.model import Verify
    from qmpnet.core.ports import GuestOps
    from qmpnet.settings import Settings

# Every qmpnet module but the errors is imported inside the function that needs it, so that `qmpnet --help` and a
# direct-mode `nic add` load only what they use (the import-time budget is in docs/performance.md).

T = TypeVar("T")


def setup_logging(verbose: bool) -> None:
    """Warnings as ``warning: ...`` lines; with ``--verbose`` everything, the libraries' debug output included."""
    from qmpnet.logconfig import configure as configure_logging  # noqa: PLC0415 - see the module's imports

    if verbose:
        configure_logging(logging.DEBUG, "text")
    else:
        configure_logging(logging.WARNING, "cli")


# The CLI's value types are NamedTuples: every command defines them at its start, and a frozen dataclass compiles
# six methods for that (3.7 M instructions a class, a NamedTuple 0.65 M; docs/performance.md).
class Where(NamedTuple):
    """The guest a command acts on: directly (``--qmp``) or through a controller (``--broker`` and ``--guest``)."""

    qmp: str | None
    broker: list[str] | None = None
    guest: str | None = None
    controller: str | None = None
    state_dir: Path | None = None
    qga: str | None = None
    protocol: StrEnum | None = None  # options.ProtocolArg


async def _controller_serves(control: Path, address: str, timeout: float) -> bool:
    from qmpnet.serve.control_socket import controller_serves  # noqa: PLC0415 - only with a controller on this host

    return await controller_serves(control, address, timeout)


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
    if (where.qmp is None) == (not where.broker) or (not where.broker) != (where.guest is None):
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
                from qmpnet.serve.control_socket import ControlGuest  # noqa: PLC0415 - only with a controller on this host

                timeouts = {"timeout": settings.mqtt.request_timeout, "verify_timeout": settings.qga.verify_timeout}
                return await op(ControlGuest(control, where.qmp, **timeouts))
            from qmpnet.api.direct import connect  # noqa: PLC0415 - see the module's imports

            async with connect(where.qmp, settings=settings, qga=where.qga) as guest:
                return await op(guest)
        from qmpnet.client import Client  # noqa: PLC0415 - the MQTT stack is loaded only in broker mode

        async with Client(where.broker, settings=settings.mqtt) as client:
            return await op(client.guest(where.controller or settings.mqtt.controller_id, where.guest or ""))

    return run(session())


class GuestCall(NamedTuple):
    """What the shared options of a guest command say: where the guest is, the settings, and how to answer."""

    where: Where
    config: Path | None
    verbose: bool
    as_json: bool
    verify: Verify = False

    def run(
        self, op: Callable[[GuestOps], Awaitable[T]], *, policy_check: Callable[[Settings], None] | None = None
    ) -> T:
        """:func:`run_on_guest` with these options."""
        return run_on_guest(self.where, self.config, self.verbose, op, policy_check=policy_check)

    def emit(self, value: BaseModel | dict[str, Any], table: Callable[[], str]) -> None:
        """Print ``value`` as ``--json`` asks: JSON, or the readable ``table``."""
        emit(value, self.as_json, table)


def run_on_host(config: Path | None, verbose: bool, op: Callable[[Settings], Coroutine[Any, Any, T]]) -> T:
    """Run host-side ``op`` with the settings; errors become exit status 1."""
    from qmpnet.settings import load_settings  # noqa: PLC0415 - see the module's imports

    setup_logging(verbose)
    settings = checked(lambda: load_settings(config))
    return run(op(settings))


def check_request(op: str, arguments: dict[str, object]) -> None:
    """Check a NIC's id and the other arguments as the MQTT API checks its request ``op``.

    Raises:
        InvalidRequest: Names the field (``id``, ``timeout``) and says why.
    """
    from qmpnet.api.wire.envelopes import parse_request  # noqa: PLC0415
    from qmpnet.core.names import check_qemu_id  # noqa: PLC0415 - see the module's imports

    nic_id = arguments.get("id")
    if isinstance(nic_id, str):
        try:
            check_qemu_id(nic_id)
        except ValueError as err:
            raise InvalidRequest(f"id: {err}", field="id") from err
    parse_request(op, "guest", arguments)
