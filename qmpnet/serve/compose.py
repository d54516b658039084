"""``qmpnet serve``: the composition root of the MQTT-driven controller.

Settings become adapters (the QMP connector, the MQTT bus, the metrics endpoint), the adapters are handed to the
controller, and everything runs in one ``TaskGroup`` until SIGTERM or SIGINT. Shutdown is ordered: the controller
stops first (guest connections closed), then the bus publishes ``offline`` and disconnects cleanly, so the broker
does not send the will. A broker that keeps refusing us (bad credentials, an MQTT version it does not speak) ends
the process with one line and exit status 1. The one other composition root is direct mode
(:mod:`qmpnet.api.direct`): one guest, its record, the QMP adapter and the host, no controller and no bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Final

from qmpnet.adapters.hostnet.host import HostNet
from qmpnet.adapters.mqtt.bus import MqttBus
from qmpnet.adapters.qmp import QmpMonitor
from qmpnet.adapters.store import StateDir
from qmpnet.errors import BrokerUnavailable, Busy, InvalidRequest
from qmpnet.logconfig import JsonFormatter, configure
from qmpnet.serve.control_socket import serve_control
from qmpnet.serve.controller import Controller
from qmpnet.settings import load_settings, redact_url

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from qmpnet.core.ports import Connection, GuestStore
    from qmpnet.settings import LogSettings, Settings

__all__ = ["JsonFormatter", "configure_logging", "main", "raise_open_file_limit", "serve", "tune_collector"]

log = logging.getLogger(__name__)


def configure_logging(settings: LogSettings) -> None:
    """Log to stderr at the configured level, as text or JSON lines; qemu.qmp and paho quiet unless DEBUG.

    The controller reports a guest it cannot reach; qemu.qmp's own ERROR line for each failed connection attempt
    would repeat that on every retry.
    """
    configure(settings.level, settings.format)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit of open files to the hard one; returns the (soft, hard) limits now in force.

    Each guest costs the controller a QMP socket and a lock file (and a guest agent socket while one is used), so
    the usual soft limit of 1024 would stop a fleet at about 500 guests. The hard limit is the operator's (systemd:
    ``LimitNOFILE``); a limit that cannot be raised is logged and kept.
    """
    import resource  # noqa: PLC0415 - only the controller needs it

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as err:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, err)
        return soft, hard
    return hard, hard


#: Allocations between two young-generation collections (CPython's default is 700). A fleet's state is thousands
#: of long-lived objects per guest and little garbage: with the default, a 3,000-guest connect spent a quarter of
#: its time walking the same live objects again.
GC_YOUNG_THRESHOLD: Final = 20_000


def tune_collector() -> None:
    """Fit the cyclic garbage collector to a long-running controller.

    What start-up made (modules, models, settings) is moved out of every later collection (``gc.freeze``), and the
    young generation is collected every ``GC_YOUNG_THRESHOLD`` allocations instead of 700; the older generations
    keep CPython's ratios.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def serve_settings(settings: Settings) -> Settings:
    """The settings as the controller applies them to remote callers.

    Direct mode lets whoever holds the QMP socket use any existing bridge and capture file; over MQTT a caller
    gets only the bridges, macvtap parent links and capture directories the operator lists (``[policy]
    allowed_bridges``, ``allowed_macvtap_links``, ``allowed_capture_dirs``), so an unset list means none.
    """
    policy = settings.policy
    listed = ("allowed_bridges", "allowed_macvtap_links", "allowed_capture_dirs")
    unset: dict[str, list[str]] = {name: [] for name in listed if getattr(policy, name) is None}
    if not unset:
        return settings
    return settings.model_copy(update={"policy": policy.model_copy(update=unset)})


async def serve(settings: Settings, *, version: str) -> None:
    """Run the controller until SIGTERM or SIGINT (or cancellation), then shut down cleanly.

    Waits for the stop signal; connects guests and the broker meanwhile, retrying both for ever.
    """

    async def connect(name: str, address: str) -> Connection:
        return await QmpMonitor.connect(
            address,
            name=name,
            connect_timeout=settings.qmp.connect_timeout,
            command_timeout=settings.qmp.command_timeout,
            read_attempts=settings.qmp.read_attempts,
        )

    soft, _ = raise_open_file_limit()
    metrics = None
    if settings.metrics.port is not None:
        from qmpnet.serve.metrics import Metrics  # noqa: PLC0415 - prometheus-client is loaded only when asked for

        metrics = Metrics()
    settings = serve_settings(settings)
    state = StateDir(settings.state_dir, boot_id_file=settings.boot_id_file)
    held = await state.lock_controller()  # one controller per state directory (and so per control socket)

    async def open_store(name: str, address: str) -> GuestStore:
        return await state.open_guest(address, name, wait=settings.qmp.connect_timeout)

    bus = MqttBus(settings.mqtt)
    controller = Controller(
        settings, bus, connect, version=version, observer=metrics, host=HostNet(settings.hostnet), open_store=open_store
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "qmpnet %s serving as %s on %s (%d configured guests, guest directory %s; %d open files allowed)",
        version,
        settings.mqtt.controller_id,
        ", ".join(redact_url(url) for url in settings.mqtt.urls),
        len(settings.controller.guests),
        settings.controller.guest_dir,
        soft,
    )
    endpoint = None
    if metrics is not None and settings.metrics.port is not None:
        endpoint = metrics.serve(settings.metrics.host, settings.metrics.port)
    control = await serve_control(state.control_socket, controller)
    try:
        async with asyncio.TaskGroup() as tasks:
            bus_task = tasks.create_task(bus.run(controller), name="qmpnet.adapters.mqtt")
            controller_task = tasks.create_task(controller.run(), name="qmpnet.serve.controller")
            await stop.wait()
            started = time.monotonic()
            log.info("stopping: letting operations in flight finish (at most %g s)", settings.lane.stop_grace)
            await controller.drain(settings.lane.stop_grace)
            controller_task.cancel()
            await asyncio.gather(controller_task, return_exceptions=True)
            bus_task.cancel()
        log.info("stopped in %.2f s", time.monotonic() - started)
    finally:
        os.close(held)
        control.close()
        with contextlib.suppress(FileNotFoundError):
            state.control_socket.unlink()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if endpoint is not None:
            endpoint.shutdown()


def main(  # noqa: PLR0913 - one keyword per command-line flag
    config: Path | None = None,
    *,
    brokers: Sequence[str] | None = None,
    controller_id: str | None = None,
    guests: list[str] | None = None,
    guest_dir: Path | None = None,
    metrics_port: int | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    state_dir: Path | None = None,
    mqtt_protocol: str | None = None,
) -> int:
    """``qmpnet serve``: load the settings (file, environment, these flags) and serve; returns the exit status.

    A bad configuration prints one line ``error: invalid_request: <setting>: <why>`` and returns 2; a broker that
    refuses our credentials or MQTT version ``mqtt.max_refusals`` times in a row, ``error: guest_unavailable: ...``
    and 1.
    """
    from qmpnet import __version__  # noqa: PLC0415 - the package imports this module's neighbours

    mqtt: dict[str, object] = {
        "brokers": list(brokers) if brokers else None, "controller_id": controller_id, "protocol": mqtt_protocol
    }
    fleet: dict[str, object] = {"guest_dir": guest_dir}
    log_settings: dict[str, object] = {"format": log_format, "level": log_level.upper() if log_level else None}
    try:
        pairs = [_guest_pair(item) for item in guests or []]
        if pairs:
            fleet["guests"] = dict(pairs)
        overrides: dict[str, object] = {
            "mqtt": _given(mqtt),
            "controller": _given(fleet),
            "metrics": _given({"port": metrics_port}),
            "log": _given(log_settings),
        }
        if state_dir is not None:
            overrides["state_dir"] = state_dir
        settings = load_settings(config, **{key: value for key, value in overrides.items() if value})
    except InvalidRequest as err:
        print(f"error: {err.code}: {err.message}", file=sys.stderr)  # noqa: T201 - the command's one-line verdict
        return 2
    configure_logging(settings.log)
    tune_collector()  # here, not in serve(): a process that embeds serve() keeps its own collector settings
    try:
        asyncio.run(serve(settings, version=__version__))
    except (InvalidRequest, Busy) as err:
        print(f"error: {err.code}: {err.message}", file=sys.stderr)  # noqa: T201 - the command's one-line verdict
        return 2
    except BaseExceptionGroup as group:  # from the TaskGroup: the bus gave up on the broker
        refusal = _refusal(group)
        if refusal is None:
            raise
        print(f"error: {refusal.code}: {refusal.message}", file=sys.stderr)  # noqa: T201 - the one-line verdict
        return 1
    return 0


def _refusal(group: BaseExceptionGroup[BaseException]) -> BrokerUnavailable | None:
    """The broker's refusal in ``group`` (nested groups included), if that is what ended the run."""
    for member in group.exceptions:
        if isinstance(member, BrokerUnavailable):
            return member
        if isinstance(member, BaseExceptionGroup):
            found = _refusal(member)
            if found is not None:
                return found
    return None


def _guest_pair(item: str) -> tuple[str, str]:
    name, sep, address = item.partition("=")
    if not sep or not name or not address:
        raise InvalidRequest(f"--guest: {item!r} is not NAME=QMP_SOCKET", field="--guest")
    return name, address


def _given(values: dict[str, object]) -> dict[str, object]:
    return {key: value for key, value in values.items() if value is not None}
