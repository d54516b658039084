"""Live capture (qmpnet.guest.capture) against a recording monitor: the QMP it sends and how QEMU's refusals read."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from fakemonitor import RecordingMonitor

from qmpnet.core.model import CaptureResult, Nic, PciAddress
from qmpnet.core.policy import Policy
from qmpnet.errors import Conflict, Forbidden, InvalidRequest, NotFound, QmpCommandError, Unsupported
from qmpnet.guest.capture import capture_id, check_capture, run_capture, start_capture, stop_capture

if TYPE_CHECKING:
    from collections.abc import Mapping


def nic(netdev: str | None = "user0.net") -> Nic:
    return Nic(id="user0", model="e1000", mac="52:54:00:00:00:09", netdev=netdev, backend=None,
               pci=PciAddress(bus="pci.0", slot=5, function=0), link="up", state="active")


class AnsweringMonitor(RecordingMonitor):
    """A recording monitor that answers some commands with a value (``qom-get`` the file)."""

    def __init__(self, answers: dict[str, object]) -> None:
        super().__init__()
        self.answers = answers

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        await super().execute(command, arguments)
        return self.answers.get(command, {})


def refused(command: str, message: str) -> QmpCommandError:
    return QmpCommandError(f"{command}: {message}", qmp_class="GenericError", command=command)


async def test_start_adds_a_filter_dump_on_the_netdev() -> None:
    monitor = RecordingMonitor()
    result = await start_capture(monitor, nic(), "/var/cap/a.pcap")
    assert monitor.executed == [("object-add", {"qom-type": "filter-dump", "id": "user0.capture",
                                                "netdev": "user0.net", "file": "/var/cap/a.pcap"})]
    assert result == CaptureResult(id="user0", state="capturing", file="/var/cap/a.pcap")


async def test_a_second_start_is_a_conflict() -> None:
    monitor = RecordingMonitor()
    monitor.errors["object-add"] = refused("object-add", "attempt to add duplicate property 'user0.capture' to "
                                           "object (type 'container')")
    with pytest.raises(Conflict) as caught:
        await start_capture(monitor, nic(), "/var/cap/a.pcap")
    assert caught.value.field == "id"


async def test_qemu_failing_to_open_the_file_is_its_error() -> None:
    monitor = RecordingMonitor()
    monitor.errors["object-add"] = refused("object-add", "net dump: can't open /x/a.pcap: No such file or directory")
    with pytest.raises(QmpCommandError, match="can't open"):
        await start_capture(monitor, nic(), "/x/a.pcap")


async def test_a_nic_without_netdev_cannot_be_captured() -> None:
    with pytest.raises(Unsupported) as caught:
        await start_capture(RecordingMonitor(), nic(netdev=None), "/var/cap/a.pcap")
    assert caught.value.field == "id"


async def test_stop_reads_the_file_then_deletes_the_object() -> None:
    monitor = AnsweringMonitor({"qom-get": "/var/cap/a.pcap"})
    result = await stop_capture(monitor, "user0")
    assert monitor.executed == [("qom-get", {"path": "/objects/user0.capture", "property": "file"}),
                                ("object-del", {"id": "user0.capture"})]
    assert result == CaptureResult(id="user0", state="stopped", file="/var/cap/a.pcap")


async def test_stop_without_a_capture_is_not_found_and_deletes_nothing() -> None:
    monitor = RecordingMonitor()
    monitor.errors["qom-get"] = refused("qom-get", "Device '/objects/user0.capture' not found")
    with pytest.raises(NotFound) as caught:
        await stop_capture(monitor, "user0")
    assert caught.value.field == "id"
    assert monitor.commands == ["qom-get"]


async def test_run_capture_needs_the_nic_to_start_but_not_to_stop() -> None:
    monitor = RecordingMonitor()
    with pytest.raises(NotFound):
        await run_capture(monitor, {}, "user0", "start", "/var/cap/a.pcap")
    assert monitor.executed == []
    await run_capture(monitor, {}, "user0", "stop", None)
    assert monitor.commands == ["qom-get", "object-del"]


@pytest.mark.parametrize(
    ("action", "file", "policy", "error", "field"),
    [
        ("start", None, Policy(), InvalidRequest, "file"),
        ("start", "a.pcap", Policy(), InvalidRequest, "file"),
        ("start", "/var/cap/../etc/x", Policy(), InvalidRequest, "file"),
        ("start", "/var/cap/", Policy(), InvalidRequest, "file"),
        ("start", "/etc/x.pcap", Policy(allowed_capture_dirs=["/var/cap"]), Forbidden, "file"),
        ("rewind", None, Policy(), InvalidRequest, "action"),
    ],
)
def test_check_capture_refuses_before_anything_is_sent(
    action: str, file: str | None, policy: Policy, error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as caught:
        check_capture(action, file, policy)
    assert getattr(caught.value, "field", None) == field


def test_check_capture_passes_what_is_fine() -> None:
    assert check_capture("start", "/var/cap/a.pcap", Policy(allowed_capture_dirs=["/var/cap"])) == "/var/cap/a.pcap"
    assert check_capture("stop", None, Policy(allowed_capture_dirs=[])) is None
    assert capture_id("lan0") == "lan0.capture"
