"""The lab host's command line, boot configuration and refusals, without booting it (tests/integration/test_lab.py
boots it)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from qmpnet.testguest import lab as lab_module
from qmpnet.testguest import labagent
from qmpnet.testguest.build import BuildError
from qmpnet.testguest.lab import Lab, LabError, LabState, qemu_command
from qmpnet.testguest.labimage import LabImage

IMAGE = LabImage(kernel=Path("/c/vmlinux"), initrd=Path("/c/initrd.gz"), modules=Path("/c/m/6.1.0-57-amd64"),
                 release="6.1.0-57-amd64")  # fmt: skip


def test_each_function_has_a_root_port_and_the_pair_sits_behind_one_bridge() -> None:
    args = qemu_command(IMAGE, Path("/s"), 3, ["/work/x"], 4242)
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    assert "intel-iommu" in devices
    assert [d for d in devices if d.startswith("e1000e,")] == [f"e1000e,bus=lab_rp{i},id=lab_fn{i}" for i in range(3)]
    assert [d for d in devices if d.startswith("e1000,")] == [
        "e1000,bus=lab_bridge,addr=1,id=lab_shared0", "e1000,bus=lab_bridge,addr=2,id=lab_shared1"
    ]
    assert "pcie-pci-bridge,id=lab_bridge,bus=lab_rp_bridge" in devices
    assert "intel_iommu=on" in args[args.index("-append") + 1]
    fsdevs = [args[i + 1] for i, a in enumerate(args) if a == "-fsdev"]
    assert fsdevs[0].startswith("local,id=host,path=/,readonly=on")
    assert fsdevs[1].startswith("local,id=share0,path=/work/x,")
    assert "readonly" not in fsdevs[1]
    assert "hostfwd=tcp:127.0.0.1:4242-10.0.2.15:7000" in next(a for a in args if a.startswith("user,"))


def test_no_image_and_no_way_to_build_it_is_a_lab_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_image(**_: object) -> LabImage:
        raise BuildError("apt-get download failed")

    monkeypatch.setattr(lab_module, "ensure_lab_image", no_image)
    with pytest.raises(LabError, match="no lab image, and it cannot be built: apt-get download failed"):
        Lab.ensure(directory=tmp_path)


def test_a_running_lab_that_does_not_fit_says_how_to_end_it(tmp_path: Path) -> None:
    lab = Lab(tmp_path, LabState(pid=1, port=1, functions=2, release="r", shares=["/work/a"]), "t", booted_here=False)
    with pytest.raises(LabError, match=r"has 2 functions, not 4.*lab --stop"):
        lab.check_fits(4, ["/work/a"])
    with pytest.raises(LabError, match="shares /work/a writable, not /work/b"):
        lab.check_fits(2, ["/work/b"])
    lab.check_fits(2, ["/work/a/sub"])


def test_no_state_means_no_lab(tmp_path: Path) -> None:
    assert Lab.find(tmp_path) is None
    (tmp_path / "state.json").write_text('{"pid": 999999999, "port": 1, "functions": 2, "release": "r"}')
    (tmp_path / "token").write_text("t")
    assert Lab.find(tmp_path) is None  # the pid is gone


def test_the_boot_configuration_is_shell_for_the_init_script(tmp_path: Path) -> None:
    text = lab_module._boot_config(IMAGE, tmp_path, ["/work/a", "/work/b"])
    values = {key: shlex.split(value)[0] for key, value in (line.split("=", 1) for line in text.splitlines())}
    assert values["LAB_SHARES"] == "share0=/work/a share1=/work/b"
    assert values["LAB_RELEASE"] == "6.1.0-57-amd64"


def test_a_share_with_a_blank_in_its_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="holds a blank"):
        Lab.ensure(directory=tmp_path, shares=[tmp_path / "with space"])


class _Agent:
    """A stand-in for the lab's agent on a loopback port: answers ``info`` (``answer=True``) or hangs up at once."""

    def __init__(self, *, answer: bool) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                with conn:
                    conn.makefile("rb").readline()
                    if self.answer:
                        payload = json.dumps({"release": "r", "functions": [], "shared_group": []}).encode()
                        conn.sendall(labagent.HEADER.pack(labagent.END, len(payload)) + payload)


def _lab_at(tmp_path: Path, pid: int, port: int) -> Lab:
    return Lab(tmp_path, LabState(pid=pid, port=port, functions=2, release="r"), "t", booted_here=False)


def test_a_lab_whose_qemu_ended_does_not_answer_and_no_time_is_spent_waiting(tmp_path: Path) -> None:
    ended = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    agent = _Agent(answer=True)
    started = time.monotonic()
    assert not _lab_at(tmp_path, int(ended.stdout), agent.port).answers(within=30)
    assert time.monotonic() - started < 5  # the pid is gone: no polling until the deadline


def test_a_lab_that_hangs_up_on_every_request_counts_as_gone_after_the_deadline(tmp_path: Path) -> None:
    agent = _Agent(answer=False)
    assert not _lab_at(tmp_path, os.getpid(), agent.port).answers(within=1.5)


def test_a_lab_whose_agent_answers_is_up(tmp_path: Path) -> None:
    agent = _Agent(answer=True)
    assert _lab_at(tmp_path, os.getpid(), agent.port).answers(within=5)
