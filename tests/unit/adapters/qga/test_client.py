"""The guest agent adapter against a fake agent: sync, errors, the guest view, wait_for and socket discovery."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fakeqga import FakeQga, interface

from qmpnet.adapters.qga import GuestAgent, find_agent_socket, guest_views, satisfies, server_socket_path, wait_for
from qmpnet.adapters.qmp import QmpMonitor
from qmpnet.core.model import GuestView
from qmpnet.errors import AgentCommandError, AgentUnavailable, GuestUnavailable, NotVerified, QmpCommandError
from qmpnet.settings import QgaSettings, Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from fakeqmp import FakeQmp

FAST = QgaSettings(connect_timeout=0.5, command_timeout=0.3, verify_timeout=1.0, poll_interval=0.01)
MAC = "52:54:00:00:00:01"


@pytest.fixture
async def qga(sockdir: Path) -> AsyncIterator[FakeQga]:
    async with FakeQga(sockdir / "vm1.qga") as agent:
        yield agent


async def test_sync_skips_stale_bytes_and_stale_sync_answers(qga: FakeQga) -> None:
    qga.stale = b'{"return": {}}\n\xff{"return": 7}\njunk'
    qga.set_interface("ens4", MAC, "10.0.2.15/24", "fe80::5054:ff:fe00:1/64")
    async with GuestAgent.connect(qga.path, FAST) as agent:
        views = await agent.interfaces()
    assert views == [
        GuestView(
            ifname="ens4", mac=MAC, carrier=True, operstate="up", addresses=["10.0.2.15/24", "fe80::5054:ff:fe00:1/64"]
        )
    ]
    assert qga.open_handles == 0


async def test_lo_and_interfaces_without_a_mac_are_left_out_and_unknown_members_ignored(qga: FakeQga) -> None:
    qga.interfaces = [
        interface("lo", "00:00:00:00:00:00", "127.0.0.1/8"),
        {"name": "tun0"},
        interface("enp1s0", "52:54:00:AB:CD:EF", "10.0.2.15/24", extra=True),
    ]
    async with GuestAgent.connect(qga.path, FAST) as agent:
        views = await agent.interfaces()
    assert [(v.ifname, v.mac) for v in views] == [("enp1s0", "52:54:00:ab:cd:ef")]
    assert views[0].carrier is None  # no sysfs files in the fake for it: unreadable, not an error
    assert views[0].operstate is None


async def test_carrier_of_an_interface_that_is_down_is_none(qga: FakeQga) -> None:
    qga.set_interface("ens4", MAC, carrier=None, operstate="down")
    async with GuestAgent.connect(qga.path, FAST) as agent:
        view = await agent.interface_for(MAC.upper())
    assert view is not None
    assert (view.carrier, view.operstate) == (None, "down")
    assert qga.open_handles == 0


async def test_interface_for_a_missing_mac_is_none(qga: FakeQga) -> None:
    qga.set_interface("ens4", MAC)
    async with GuestAgent.connect(qga.path, FAST) as agent:
        assert await agent.interface_for("52:54:00:00:00:02") is None
        with pytest.raises(ValueError, match="hex octets"):
            await agent.interface_for("not-a-mac")


async def test_an_agent_error_is_an_agent_command_error(qga: FakeQga) -> None:
    qga.errors["guest-network-get-interfaces"] = ("GenericError", "boom")
    async with GuestAgent.connect(qga.path, FAST) as agent:
        with pytest.raises(AgentCommandError, match="guest-network-get-interfaces: boom") as caught:
            await agent.interfaces()
    assert isinstance(caught.value, QmpCommandError)
    assert (caught.value.code, caught.value.qmp_class) == ("qmp_error", "GenericError")


async def test_a_silent_agent_is_unavailable_after_the_connect_timeout(qga: FakeQga) -> None:
    qga.silent = True
    with pytest.raises(AgentUnavailable, match=r"did not answer guest-sync within 0\.5 s") as caught:
        await GuestAgent.open(qga.path, FAST)
    assert isinstance(caught.value, GuestUnavailable)
    assert caught.value.code == "guest_unavailable"


async def test_nothing_listening_is_unavailable(sockdir: Path) -> None:
    with pytest.raises(AgentUnavailable, match="cannot connect"):
        await GuestAgent.open(sockdir / "none.qga", FAST)


async def test_a_late_answer_is_skipped_by_the_next_command(qga: FakeQga) -> None:
    qga.set_interface("ens4", MAC)
    qga.delays["guest-network-get-interfaces"] = 0.5  # longer than command_timeout
    async with GuestAgent.connect(qga.path, FAST) as agent:
        with pytest.raises(AgentUnavailable, match=r"no answer to guest-network-get-interfaces within 0\.3 s"):
            await agent.network_interfaces()
        # The late answer is still on its way; the next command synchronises first and reads its own answer.
        assert [i.name for i in await agent.network_interfaces()] == ["ens4"]
    assert qga.received.count("guest-sync-delimited") == 2


async def test_a_closed_agent_refuses_commands(qga: FakeQga) -> None:
    agent = await GuestAgent.open(qga.path, FAST)
    await agent.close()
    with pytest.raises(AgentUnavailable, match="closed"):
        await agent.execute("guest-ping")


async def test_guest_views_are_none_when_no_agent_answers(qga: FakeQga, sockdir: Path) -> None:
    qga.set_interface("ens4", MAC, "10.0.2.15/24")
    views = await guest_views(qga.path, FAST)
    assert views is not None
    assert set(views) == {MAC}
    assert views[MAC].ifname == "ens4"
    assert await guest_views(None, FAST) is None
    assert await guest_views(sockdir / "none.qga", FAST) is None
    qga.silent = True
    assert await guest_views(qga.path, FAST) is None


async def test_exec_polls_until_the_process_exits(qga: FakeQga) -> None:
    qga.exec_output = "hello\n"
    async with GuestAgent.connect(qga.path, FAST) as agent:
        done = await agent.exec(["/bin/sh", "-c", "echo hello"], timeout=5)
    assert (done.ok, done.stdout) == (True, "hello\n")
    assert qga.exec_argv == [["/bin/sh", "-c", "echo hello"]]
    assert qga.received.count("guest-exec-status") == 2


# --- wait_for ------------------------------------------------------------------------------------------------


def view(*addresses: str, carrier: bool | None = True) -> GuestView:
    return GuestView(ifname="ens4", mac=MAC, carrier=carrier, operstate="up", addresses=list(addresses))


@pytest.mark.parametrize(
    ("current", "want", "expected"),
    [
        (None, "present", False),
        (view(), "present", True),
        (None, "absent", True),
        (view(), "absent", False),
        (view("fe80::1/64", "169.254.3.4/16"), "address", False),
        (view("fe80::1/64", "10.0.2.15/24"), "address", True),
        (view("fec0::5054:ff:fe00:1/64"), "address", True),
        (view(carrier=True), "carrier_up", True),
        (view(carrier=False), "carrier_up", False),
        (view(carrier=False), "carrier_down", True),
        (view(carrier=None), "carrier_down", False),
        (view(carrier=None), "carrier_up", False),
        (None, "carrier_down", False),
    ],
)
def test_satisfies(current: GuestView | None, want: Any, expected: bool) -> None:
    assert satisfies(current, want) is expected


async def test_wait_for_returns_once_the_interface_appears(qga: FakeQga) -> None:
    qga.script = [[], [], [interface("ens4", MAC, "fe80::1/64")], [interface("ens4", MAC, "10.0.2.15/24")]]
    qga.sysfs("ens4")
    async with GuestAgent.connect(qga.path, FAST) as agent:
        present = await wait_for(agent, MAC, "present")
        assert present is not None
        assert present.addresses == ["fe80::1/64"]
        assert qga.received.count("guest-network-get-interfaces") == 3
        addressed = await wait_for(agent, MAC, "address")
        assert addressed is not None
        assert addressed.addresses == ["10.0.2.15/24"]


async def test_wait_for_absent_returns_none(qga: FakeQga) -> None:
    qga.script = [[interface("ens4", MAC)], []]
    qga.sysfs("ens4")
    async with GuestAgent.connect(qga.path, FAST) as agent:
        assert await wait_for(agent, MAC, "absent") is None
    assert qga.received.count("guest-network-get-interfaces") == 2


async def test_wait_for_raises_not_verified_with_what_the_guest_showed(qga: FakeQga) -> None:
    qga.set_interface("ens4", MAC, "fe80::1/64", carrier="0")
    async with GuestAgent.connect(qga.path, FAST) as agent:
        with pytest.raises(NotVerified) as caught:
            await wait_for(agent, MAC, "address", timeout=0.2)
    error = caught.value
    assert error.code == "not_verified"
    assert f"an interface with an address for {MAC} within 0.2 s" in error.message
    assert "ens4 carrier=0 operstate=up fe80::1/64" in error.message


async def test_wait_for_with_a_deadline_shorter_than_one_look(qga: FakeQga) -> None:
    qga.set_interface("ens4", MAC)
    qga.delays["guest-network-get-interfaces"] = 0.2
    async with GuestAgent.connect(qga.path, FAST) as agent:
        with pytest.raises(NotVerified, match="nothing yet"):
            await wait_for(agent, MAC, "present", timeout=0.05)
        # The connection stays usable: the cut-short look's answer is skipped.
        assert await wait_for(agent, MAC, "present") is not None


async def test_wait_for_refuses_bad_arguments(qga: FakeQga) -> None:
    async with GuestAgent.connect(qga.path, FAST) as agent:
        with pytest.raises(ValueError, match="want must be one of"):
            await wait_for(agent, MAC, "up")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="hex octets"):
            await wait_for(agent, "52:54", "present")


# --- discovery and settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("disconnected:unix:/run/vm1.qga,server=on", Path("/run/vm1.qga")),
        ("unix:/run/vm1.qga,server=on", Path("/run/vm1.qga")),
        ("unix:/run/a,b.qga,server=on", Path("/run/a,b.qga")),
        ("disconnected:unix:/run/vm1.qga", None),  # QEMU is the client
        ("disconnected:tcp:127.0.0.1:4444,server=on", None),
        ("pty:/dev/pts/3", None),
        ("unix:relative.sock,server=on", None),
    ],
)
def test_server_socket_path(filename: str, expected: Path | None) -> None:
    assert server_socket_path(filename) == expected


def _qom(ports: dict[str, dict[str, str]]) -> tuple[Any, Any]:
    async def qom_list(arguments: dict[str, Any]) -> object:
        if arguments["path"] == "/machine/peripheral-anon":
            return [{"name": "type", "type": "string"}] + [
                {"name": name, "type": "child<virtserialport>"} for name in ports
            ]
        return [{"name": "type", "type": "string"}, {"name": "vser0", "type": "child<virtio-serial-pci>"}]

    async def qom_get(arguments: dict[str, Any]) -> object:
        name = arguments["path"].rpartition("/")[2]
        return ports[name][arguments["property"]]

    return qom_list, qom_get


@pytest.mark.parametrize(
    ("ports", "chardevs", "expected"),
    [
        (
            {
                "device[0]": {"name": "other", "chardev": "c1"},
                "device[1]": {"name": "org.qemu.guest_agent.0", "chardev": "qga0"},
            },
            {"c1": "unix:/run/other.sock,server=on", "qga0": "disconnected:unix:/run/vm1.qga,server=on"},
            Path("/run/vm1.qga"),
        ),
        ({"device[0]": {"name": "org.qemu.guest_agent.0", "chardev": "qga0"}}, {"qga0": "unix:/run/vm1.qga"}, None),
        ({"device[0]": {"name": "other", "chardev": "c1"}}, {"c1": "unix:/run/other.sock,server=on"}, None),
        ({}, {}, None),
    ],
)
async def test_find_agent_socket(
    fake: FakeQmp, ports: dict[str, dict[str, str]], chardevs: dict[str, str], expected: Path | None
) -> None:
    qom_list, qom_get = _qom(ports)
    fake.on("qom-list", qom_list)
    fake.on("qom-get", qom_get)

    async def query_chardev(arguments: dict[str, Any]) -> object:
        return [{"label": label, "filename": filename, "frontend-open": False} for label, filename in chardevs.items()]

    fake.on("query-chardev", query_chardev)
    monitor = await QmpMonitor.connect(str(fake.path), name="vm1", connect_timeout=1, command_timeout=1)
    try:
        assert await find_agent_socket(monitor) == expected
    finally:
        await monitor.close()


def test_qga_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMPNET_QGA__VERIFY_TIMEOUT", "7.5")
    settings = Settings()
    assert settings.qga.verify_timeout == 7.5
    assert settings.qga.connect_timeout == QgaSettings().connect_timeout


async def test_present_waits_until_udev_has_named_the_interface(qga: FakeQga) -> None:
    qga.set_interface("eth0", MAC)
    qga.files["/sys/class/net/eth0/name_assign_type"] = "1\n"  # the kernel's enumerated name
    qga.files["/sys/class/net/eth0/ifindex"] = "3\n"
    qga.files["/run/udev/control"] = ""
    async with GuestAgent.connect(qga.path, FAST) as agent:
        with pytest.raises(NotVerified, match="an interface for"):
            await wait_for(agent, MAC, "present", timeout=0.2)
        qga.files["/run/udev/data/n3"] = "E:ID_RENAMING=1\nV:1\n"  # udev's record while it renames
        with pytest.raises(NotVerified, match="an interface for"):
            await wait_for(agent, MAC, "present", timeout=0.2)
        qga.files["/run/udev/data/n3"] = "I:1\nE:ID_NET_NAME=ens4\nE:ID_RENAMING=1\n"  # about to become ens4
        with pytest.raises(NotVerified, match="an interface for"):
            await wait_for(agent, MAC, "present", timeout=0.2)
        qga.interfaces = []
        qga.set_interface("ens4", MAC)  # renamed: name_assign_type 4, udev's record names it
        qga.files["/sys/class/net/ens4/ifindex"] = "3\n"
        named = await wait_for(agent, MAC, "present")
        assert named is not None
        assert named.ifname == "ens4"
        # net.ifnames=0: udev processed it and gives no name of its own; eth0 is final.
        qga.interfaces = []
        qga.set_interface("eth0", MAC)
        qga.files["/sys/class/net/eth0/name_assign_type"] = "1\n"
        qga.files["/sys/class/net/eth0/ifindex"] = "3\n"
        qga.files["/run/udev/data/n3"] = "I:1\nE:ID_NET_DRIVER=virtio_net\n"
        kept = await wait_for(agent, MAC, "present")
    assert kept is not None
    assert kept.ifname == "eth0"


async def test_an_enumerated_name_is_final_without_udev(qga: FakeQga) -> None:
    qga.set_interface("eth0", MAC)
    qga.files["/sys/class/net/eth0/name_assign_type"] = "1\n"
    qga.files["/sys/class/net/eth0/ifindex"] = "3\n"
    async with GuestAgent.connect(qga.path, FAST) as agent:
        assert await wait_for(agent, MAC, "present") is not None
