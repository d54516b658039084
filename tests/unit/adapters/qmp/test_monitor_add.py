"""Hot-add through the real QMP adapter against the fake monitor: rollback, unknown outcomes, lost monitors."""

from __future__ import annotations

import asyncio
import socket
from itertools import takewhile
from typing import TYPE_CHECKING

import pytest
from fakeqmp import READ_ONLY, Command, FakeQmp

import qmpnet
from qmpnet.adapters.qmp import QmpMonitor
from qmpnet.errors import Busy, GuestUnavailable, OutcomeUnknown, QmpCommandError
from qmpnet.settings import QmpSettings, Settings

if TYPE_CHECKING:
    from pathlib import Path


async def test_greeting_and_happy_path(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert isinstance(guest._monitor, QmpMonitor)
        assert guest._monitor.greeting_version == ".".join(map(str, fake.capture.version))  # the fake's greeting
        nic = await guest.add_nic(
            {
                "id": "x1",
                "mac": "52:54:00:aa:bb:01",
                "link": "down",
                "backend": {"type": "user", "hostfwd": ["tcp:127.0.0.1:2222-:22"]},
            }
        )
    assert (nic.id, nic.netdev, nic.link, nic.state) == ("x1", "x1.net", "down", "active")
    assert nic.pci is not None
    assert (nic.pci.bus, nic.pci.slot) == ("pci.0", 4)  # 0-3 and 6 are taken in the captured pc guest
    assert fake.changes() == [
        Command("netdev_add", {"id": "x1.net", "type": "user", "hostfwd": [{"str": "tcp:127.0.0.1:2222-:22"}]}),
        Command(
            "device_add",
            {
                "driver": "virtio-net-pci",
                "id": "x1",
                "netdev": "x1.net",
                "mac": "52:54:00:aa:bb:01",
                "bus": "pci.0",
                "addr": "04.0",
            },
        ),
        Command("set_link", {"name": "x1", "up": False}),
    ]
    # The guest was read before the change, through QMP queries; HMP only for `info network` (no query-netdev).
    before = list(takewhile(lambda c: c.name in READ_ONLY, fake.commands()))
    assert {"qom-list", "qom-get", "query-pci"} <= {c.name for c in before}
    assert {c.arguments["command-line"] for c in before if c.name == "human-monitor-command"} == {"info network"}


async def test_failed_device_add_rolls_back_the_netdev(fake: FakeQmp, fast: Settings) -> None:
    fake.fail("device_add", "Parameter 'vectors' expects uint32")
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        with pytest.raises(QmpCommandError) as info:
            await guest.add_nic({"id": "x1"})
        assert guest.record.nics == {}  # nothing of the NIC is left in the record either
    err = info.value
    assert err.code == "qmp_error"
    assert err.qmp_class == "GenericError"
    assert err.command == "device_add"
    assert "expects uint32" in err.message
    assert fake.change_names() == ["netdev_add", "device_add", "netdev_del"]
    assert fake.changes()[0] == Command("netdev_add", {"id": "x1.net", "type": "user"})
    assert fake.changes()[2] == Command("netdev_del", {"id": "x1.net"})


async def test_a_refused_plan_is_planned_once_more_after_reading_the_guest(fake: FakeQmp, fast: Settings) -> None:
    # Another client took the slot qmpnet planned: QEMU refuses, qmpnet re-reads and plans again, once.
    fake.fail("device_add", "PCI: slot 4 function 0 not available for virtio-net-pci, in use by x")
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        reads = fake.reads()
        with pytest.raises(QmpCommandError) as info:
            await guest.add_nic({"id": "x1"})
        assert guest.record.nics == {}
    assert "in use by x" in info.value.message
    assert fake.change_names() == ["netdev_add", "device_add", "netdev_del"] * 2  # each attempt rolled back
    assert fake.reads() == reads + 1


async def test_failed_set_link_unplugs_then_deletes_the_netdev(fake: FakeQmp, fast: Settings) -> None:
    fake.fail("set_link", "Device 'x1' not found", "DeviceNotFound")
    fake.ack_unplugs()
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        with pytest.raises(QmpCommandError) as info:
            await guest.add_nic({"id": "x1", "link": "down"})
        assert info.value.qmp_class == "DeviceNotFound"
        assert fake.story() == ["netdev_add", "device_add", "set_link", "device_del", "!DEVICE_DELETED", "netdev_del"]
        assert fake.changes()[-2:] == [Command("device_del", {"id": "x1"}), Command("netdev_del", {"id": "x1.net"})]
        # The NIC never appeared.
        assert "x1" not in {nic.id for nic in await guest.list_nics()}


async def test_rollback_keeps_the_netdev_of_a_nic_the_guest_has_not_released(fake: FakeQmp) -> None:
    fake.fail("set_link", "boom")  # and device_del is answered, but the guest does not ack it in time
    settings = Settings(qmp=QmpSettings(command_timeout=0.3, rollback_unplug_timeout=0.2))
    async with qmpnet.connect(str(fake.path), settings=settings) as guest:
        with pytest.raises(QmpCommandError) as info:
            await guest.add_nic({"id": "x1", "link": "down"})
        # QEMU-FACTS: netdev_del succeeds while the NIC is attached; only issue it after DEVICE_DELETED.
        assert fake.change_names() == ["netdev_add", "device_add", "set_link", "device_del"]
        assert any("rollback incomplete" in note for note in info.value.__notes__)
        # When the guest finally lets go, the backend goes too.
        await fake.emit_many(list(fake.unplug_events("x1", forget=False)))
        await fake.wait_for_command("netdev_del")
        assert fake.changes()[-1] == Command("netdev_del", {"id": "x1.net"})


@pytest.mark.parametrize("command", ["netdev_add", "device_add"])
async def test_hung_command_is_outcome_unknown_without_rollback(fake: FakeQmp, fast: Settings, command: str) -> None:
    fake.hang(command)
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        await guest.list_nics()  # read the guest first, so only the hot-add itself can time out
        with pytest.raises(OutcomeUnknown) as info:
            await guest.add_nic({"id": "x1"})
        assert info.value.code == "outcome_unknown"
        assert f"{command}: no answer from QEMU within 0.3 s" in info.value.message  # the configured, not 10 s
        expected = ["netdev_add"] if command == "netdev_add" else ["netdev_add", "device_add"]
        assert fake.change_names() == expected
        assert any("did not roll back" in note for note in info.value.__notes__)
        assert guest.record.nics["x1"].state == "adding"  # recorded before the first command, unsettled
        # The lane re-reads the guest before its next change and settles the unanswered add: no device came,
        # so the netdev it may have left is deleted (an orphan netdev would keep its ports bound for good).
        before = len(fake.commands())
        await guest.set_link("e1", up=False)
        after = fake.commands()[before:]
        reads = list(takewhile(lambda c: c.name in READ_ONLY, after))
        assert [c.name for c in reads].count("query-pci") == 1  # one read of the guest (new devices: none)
        assert after[len(reads) :] == [
            Command("netdev_del", {"id": "x1.net"}),
            Command("set_link", {"name": "e1", "up": False}),
        ]
        assert "x1" not in guest.record.nics


async def test_dropped_connection_is_outcome_unknown_then_unavailable(fake: FakeQmp, fast: Settings) -> None:
    fake.drop_on("device_add")
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        with pytest.raises(OutcomeUnknown):
            await guest.add_nic({"id": "x1"})
        assert fake.change_names() == ["netdev_add", "device_add"]
        for call in (guest.add_nic({"id": "x2"}), guest.list_nics(), guest.set_link("e1", up=True)):
            with pytest.raises(GuestUnavailable) as info:
                await call
            assert info.value.code == "guest_unavailable"
    assert fake.change_names() == ["netdev_add", "device_add"]


async def test_monitor_that_goes_away_between_calls(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        await guest.list_nics()
        monitor = guest._monitor
        assert isinstance(monitor, QmpMonitor)
        fake.hang_up()
        await asyncio.wait_for(monitor.closed.wait(), 5)
        with pytest.raises(GuestUnavailable):
            await guest.remove_nic("e1")
    assert fake.change_names() == []


async def test_nothing_listening_is_guest_unavailable(sockdir: Path, fast: Settings) -> None:
    with pytest.raises(GuestUnavailable) as info:
        async with qmpnet.connect(str(sockdir / "nobody.qmp"), settings=fast):
            pass
    assert info.value.code == "guest_unavailable"


async def test_stale_socket_file_is_guest_unavailable(sockdir: Path, fast: Settings) -> None:
    path = sockdir / "stale.qmp"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # the file exists, but nobody listens
    with pytest.raises(GuestUnavailable):
        async with qmpnet.connect(str(path), settings=fast):
            pass


async def test_silent_monitor_is_busy_after_connect_timeout(sockdir: Path) -> None:
    settings = Settings(qmp=QmpSettings(connect_timeout=0.2))
    async with FakeQmp(sockdir / "silent.qmp", greet=False) as silent:
        # Accepted but never greeted: what QEMU does while another client holds the monitor.
        with pytest.raises(Busy, match=r"no greeting within 0\.\d+ s: another client"):  # 0.2 s, not 5 s
            async with qmpnet.connect(str(silent.path), settings=settings):
                pass
