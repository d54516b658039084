"""``qmpnet nic``: hot-add, remove, link, change, capture and list one guest's NICs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from qmpnet.cli.connect import GuestCall, check_request
from qmpnet.cli.exits import checked, fail
from qmpnet.cli.flags import Given, LinkArg
from qmpnet.cli.nic_flags import ADD_FLAGS, SET_FLAGS, build_spec, build_update
from qmpnet.cli.options import flag_options, guest_options
from qmpnet.cli.tables import backend_line, nic_table, warning_lines
from qmpnet.errors import InvalidRequest

if TYPE_CHECKING:
    from qmpnet.core.model import CaptureResult, Nic
    from qmpnet.core.ports import GuestOps

# Every qmpnet module but the errors is imported inside the function that needs it (docs/performance.md).

app = typer.Typer(help="Hot-add, remove, link and list a guest's NICs.", no_args_is_help=True, rich_markup_mode=None)


def _json(nic: Nic) -> dict[str, Any]:
    """The NIC as the MQTT API's JSON object, which the tables read (as the quick path's answers)."""
    return nic.model_dump(mode="json")


NicIdArg = Annotated[str, typer.Argument(metavar="ID", help="The NIC's id.")]


@app.command("add")
@guest_options(qga=True, verify=True, verify_address=True)
@flag_options(ADD_FLAGS)
def nic_add(call: GuestCall, flags: Given) -> None:
    """Hot-add a NIC (atomic: on failure the guest is left as it was)."""
    given = checked(lambda: build_spec(flags))
    from qmpnet.core.model import parse_nic_spec  # noqa: PLC0415 - see the module's imports
    from qmpnet.core.policy import check_spec  # noqa: PLC0415

    nic_spec = checked(lambda: parse_nic_spec(given))
    nic = call.run(
        lambda guest: guest.add_nic(nic_spec, verify=call.verify),
        policy_check=lambda settings: check_spec(nic_spec, settings.policy),
    )
    call.emit(nic, lambda: nic_table([_json(nic)]) + warning_lines(_json(nic)))


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
    call.emit(nic, lambda: nic_table([_json(nic)]))


@app.command("list")
@guest_options(qga=True)
def nic_list(call: GuestCall) -> None:
    """List the guest's NICs, cold-plugged ones included."""
    nics = call.run(lambda guest: guest.list_nics())
    listed = {"nics": [n.model_dump(mode="json") for n in nics]}
    call.emit(listed, lambda: nic_table(listed["nics"]))


@app.command("set")
@guest_options()
@flag_options(SET_FLAGS)
def nic_set(call: GuestCall, nic_id: NicIdArg, flags: Given) -> None:
    """Change a NIC live, without unplugging it: move it, tag it, shape it, filter it, set its link or MTU (atomic).

    Any --filter flag replaces the NIC's whole filter, as the flags give it.
    """
    update = checked(lambda: build_update(nic_id, flags))
    from qmpnet.core.model import parse_nic_update  # noqa: PLC0415 - see the module's imports

    checked(lambda: parse_nic_update(update))  # bad values are refused before connecting, naming the field
    nic = call.run(lambda ops: ops.update_nic(update))
    call.emit(nic, lambda: nic_table([_json(nic)]) + backend_line(_json(nic)) + warning_lines(_json(nic)))


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
