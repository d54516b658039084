"""The Debian test guest's builder decisions and its QEMU command line, without building or booting anything."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qmpnet.testguest import DebianImage, GuestImage, TestMachine
from qmpnet.testguest import debian as debian_module
from qmpnet.testguest.build import BuildError, Package
from qmpnet.testguest.debian import apt_mirror, candidate_versions, debian_cache_key
from qmpnet.testguest.machine import MachineConfig, MachineFiles, build_command_line

POLICY = """systemd:
  Installed: (none)
  Candidate: 252.38-1~deb12u1
  Version table:
     252.38-1~deb12u1 500
        500 http://mirror.example/debian bookworm/main amd64 Packages
qemu-guest-agent:
  Installed: (none)
  Candidate: 1:7.2+dfsg-7+deb12u18+b3
  Version table:
     1:10.0.2+ds-2+deb13u1~bpo12+1 100
"""
IMAGE = DebianImage(kernel=Path("/c/vmlinux"), initrd=Path("/c/initrd.gz"), rootfs=Path("/c/rootfs.ext4"))
KERNEL = Package("linux-image-6.1.0-57-amd64", "6.1.192-3")
BUSYBOX = Package("busybox-static", "1:1.35.0-4+b3")


def test_candidate_versions_come_from_one_apt_cache_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(args: list[str]) -> str:
        calls.append(args)
        return POLICY

    monkeypatch.setattr(debian_module, "run_tool", fake_run)
    versions = candidate_versions(["systemd", "qemu-guest-agent"])
    assert versions == {"systemd": "252.38-1~deb12u1", "qemu-guest-agent": "1:7.2+dfsg-7+deb12u18+b3"}
    assert calls == [["apt-cache", "policy", "systemd", "qemu-guest-agent"]]
    with pytest.raises(BuildError, match="no candidate for udev"):
        candidate_versions(["systemd", "udev"])


def test_the_mirror_is_the_one_apt_uses_for_bookworm_main(monkeypatch: pytest.MonkeyPatch) -> None:
    targets = (
        "http://security.example/debian-security/ bookworm-security main\n"
        "http://mirror.example/debian/ bookworm-backports main\n"
        "http://mirror.example/debian/ bookworm contrib\n"
        "http://mirror.example/debian/ bookworm main\n"
    )
    monkeypatch.setattr(debian_module, "run_tool", lambda _args: targets)
    assert apt_mirror() == "http://mirror.example/debian/"
    monkeypatch.setattr(debian_module, "run_tool", lambda _args: "http://x/ trixie main\n")
    assert apt_mirror() is None  # debootstrap's own default then


def test_the_cache_key_changes_with_every_input(monkeypatch: pytest.MonkeyPatch) -> None:
    versions = {"systemd": "252.38-1~deb12u1", "udev": "252.38-1~deb12u1"}
    key = debian_cache_key(KERNEL, BUSYBOX, versions)
    assert re.fullmatch(r"debian12_linux-6\.1\.192-3_[0-9a-f]{12}", key)
    assert debian_cache_key(KERNEL, BUSYBOX, dict(versions)) == key
    assert debian_cache_key(KERNEL, BUSYBOX, {**versions, "udev": "252.39-1"}) != key
    assert debian_cache_key(Package(KERNEL.name, "6.1.193-1"), BUSYBOX, versions) != key
    assert debian_cache_key(KERNEL, Package(BUSYBOX.name, "1:1.36"), versions) != key
    original = debian_module.data_file
    monkeypatch.setattr(
        debian_module, "data_file", lambda name: original(name) + (b"# edited\n" if name.endswith(".network") else b"")
    )
    assert debian_cache_key(KERNEL, BUSYBOX, versions) != key


def test_the_debian_command_line_has_a_snapshot_root_disk_and_the_agent_port(tmp_path: Path) -> None:
    files = MachineFiles.in_dir(tmp_path)
    args = build_command_line(IMAGE, MachineConfig(machine="q35", flavour="debian"), files, "tcg")
    line = " ".join(args)
    assert f"file={IMAGE.rootfs},format=raw,if=virtio,snapshot=on" in line
    assert f"socket,id=qga0,path={files.qga},server=on,wait=off" in line
    assert "virtserialport,bus=qga_serial.0,chardev=qga0,name=org.qemu.guest_agent.0" in line
    assert re.search(r"systemd\.machine_id=[0-9a-f]{32}\b", line)
    assert "chardev:agent" not in line, "no busybox agent port on the Debian guest"
    again = " ".join(build_command_line(IMAGE, MachineConfig(machine="q35", flavour="debian"), files, "tcg"))
    assert re.findall(r"machine_id=(\w+)", line) != re.findall(r"machine_id=(\w+)", again), "one id per boot"


def test_a_machine_knows_its_flavour_and_agent_socket() -> None:
    debian = TestMachine(IMAGE, flavour="debian", name="d")
    busybox = TestMachine(GuestImage(kernel=IMAGE.kernel, initrd=IMAGE.initrd), name="b")
    try:
        assert (debian.flavour, debian.qga_path) == ("debian", debian.workdir / "qga.sock")
        assert debian.config.memory_mb == 512
        assert (busybox.flavour, busybox.qga_path, busybox.config.memory_mb) == ("busybox", None, 256)
    finally:
        for machine in (debian, busybox):
            machine._forget_workdir()
    with pytest.raises(ValueError, match="needs a DebianImage"):
        TestMachine(GuestImage(kernel=IMAGE.kernel, initrd=IMAGE.initrd), flavour="debian")
    with pytest.raises(ValueError, match="flavour must be busybox or debian"):
        MachineConfig(flavour="alpine")  # type: ignore[arg-type]
