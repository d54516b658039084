"""``qmpnet serve`` runs the MQTT-driven controller; ``qmpnet guests`` asks one which guests it serves."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from qmpnet.cli.connect import setup_logging
from qmpnet.cli.exits import checked, run
from qmpnet.cli.options import (
    ConfigOpt,
    ControllerOpt,
    JsonOpt,
    ProtocolArg,
    ProtocolOpt,
    StateDirOpt,
    VerboseOpt,
    broker_option,
    protocol_option,
)
from qmpnet.cli.output import emit, format_rows

if TYPE_CHECKING:
    from qmpnet.api.wire.envelopes import GuestInfo


def serve(
    config: ConfigOpt = None,
    broker: Annotated[
        list[str] | None,
        broker_option(
            "mqtt://host:port, or mqtts://host:port for TLS; repeatable: the nodes of one cluster, tried in order "
            "(the next when the connection is lost)."
        ),
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
        ProtocolArg | None, protocol_option("MQTT version (default auto: 5, or 3.1.1 if the broker refuses 5).")
    ] = None,
    verbose: VerboseOpt = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Run the MQTT-driven controller for a fleet of guests (see docs/mqtt-api.md)."""
    from qmpnet.serve.compose import main as serve_main  # noqa: PLC0415 - the MQTT stack is loaded only for serve

    raise typer.Exit(
        serve_main(
            config, brokers=broker, controller_id=controller_id, guests=guest, guest_dir=guest_dir,
            metrics_port=metrics_port, log_format=log_format, log_level="debug" if verbose else None,
            state_dir=state_dir, mqtt_protocol=mqtt_protocol.value if mqtt_protocol is not None else None,
        )
    )


def guests(
    broker: Annotated[
        list[str],
        broker_option("mqtt[s]://host:port where `qmpnet serve` listens; repeatable (cluster nodes, tried in order)."),
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
