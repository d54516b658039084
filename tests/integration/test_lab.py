"""The lab host itself (qmpnet.testguest.lab): what it runs, what it shares, what it offers, how it fails.

These run on this machine against the run's one lab (the plugin's ``qmpnet_lab`` fixture); the tests that need the
lab's kernel run inside it (test_lab_vfio.py, and every test whose kernel need this kernel lacks: tests/needs.py).
"""

from __future__ import annotations

import platform
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from qmpnet.testguest.lab import Lab, LabError

if TYPE_CHECKING:
    from qmpnet.testguest.lab import LabResult

pytestmark = [pytest.mark.integration, pytest.mark.lab]


def ok(result: LabResult) -> str:
    assert result.ok, result.output
    return result.output


def test_commands_run_as_root_under_the_debian_kernel(qmpnet_lab: Lab) -> None:
    release = ok(qmpnet_lab.run(["uname", "-r"])).strip()
    assert release == qmpnet_lab.state.release
    assert release.endswith("-amd64")
    assert release != platform.release()
    assert ok(qmpnet_lab.run(["id", "-u"])).strip() == "0"
    print(f"\nlab kernel {release}; boot took {qmpnet_lab.state.boot_seconds} s")  # noqa: T201 - for the record


def test_the_working_directory_is_shared_writable_and_the_rest_is_not(
    qmpnet_lab: Lab, request: pytest.FixtureRequest
) -> None:
    root = request.config.rootpath
    name = f".lab-probe-{uuid.uuid4().hex[:8]}"
    elsewhere = Path("/var/tmp") / name  # noqa: S108 - a fixed path on purpose: the host must not see it
    try:
        ok(qmpnet_lab.shell(f"echo from-the-lab > {root / name} && echo also > {elsewhere}"))
        assert (root / name).read_text() == "from-the-lab\n"
        assert not elsewhere.exists()  # the lab writes over the host's root into its own overlay
        assert ok(qmpnet_lab.run(["cat", str(root / "pyproject.toml")])) == (root / "pyproject.toml").read_text()
    finally:
        (root / name).unlink(missing_ok=True)


def test_the_functions_are_alone_in_their_groups_and_the_pair_shares_one(qmpnet_lab: Lab) -> None:
    script = (
        'for f in $QMPNET_LAB_FUNCTIONS; do echo "fn $f $(basename $(readlink /sys/bus/pci/devices/$f/driver)) '
        '$(ls /sys/bus/pci/devices/$f/iommu_group/devices | wc -l)"; done; '
        "for f in $QMPNET_LAB_SHARED_GROUP; do "
        'echo "shared $f $(basename $(readlink /sys/bus/pci/devices/$f/iommu_group))"; done; '
        "ls /dev/vfio"
    )
    lines = ok(qmpnet_lab.shell(script)).splitlines()
    functions = [line.split() for line in lines if line.startswith("fn ")]
    assert len(functions) >= 2, lines
    assert [f[1] for f in functions] == qmpnet_lab.functions
    assert all(f[2:] == ["e1000e", "1"] for f in functions), functions
    shared = [line.split() for line in lines if line.startswith("shared ")]
    assert len(shared) == 2, lines
    assert shared[0][2] == shared[1][2]
    assert "vfio" in lines


def test_the_lab_has_the_kernel_features_this_machine_may_lack(qmpnet_lab: Lab) -> None:
    script = (
        "ip link add qmplab0 type dummy && tc qdisc add dev qmplab0 root netem delay 100ms loss 1% && "
        "ip link add qmplabbr type bridge vlan_filtering 1 && bridge vlan add dev qmplabbr vid 10 self && "
        "test -c /dev/vhost-net && modprobe macvtap && modprobe openvswitch && echo all-there; "
        "ip link del qmplab0; ip link del qmplabbr"
    )
    assert "all-there" in ok(qmpnet_lab.shell(script))


def test_output_streams_back_with_the_exit_status(qmpnet_lab: Lab) -> None:
    done = qmpnet_lab.shell("echo out; echo err >&2; exit 7")
    assert done.status == 7
    assert "out\n" in done.output
    assert "err\n" in done.output
    assert qmpnet_lab.shell("kill -TERM $$").status == 128 + 15


def test_a_command_that_cannot_run_is_a_clear_error(qmpnet_lab: Lab) -> None:
    with pytest.raises(LabError, match="cannot run '/no/such/program'"):
        qmpnet_lab.run(["/no/such/program"])


def test_a_command_past_its_timeout_is_an_error(qmpnet_lab: Lab) -> None:
    with pytest.raises(LabError, match="did not finish within 2"):
        qmpnet_lab.run(["sleep", "60"], timeout=2)


def test_a_boot_that_times_out_says_so_with_the_console_tail(tmp_path: Path) -> None:
    """A second lab in a state directory of its own, given one second: it stops QEMU and shows the console."""
    with pytest.raises(LabError) as caught:
        Lab.ensure(directory=tmp_path / "lab", boot_timeout=1.0)
    message = str(caught.value)
    assert "did not answer within 1 s" in message
    assert "--- console" in message
    assert "qemu-system-x86_64" in message  # the command line, for reproducing it by hand
    assert Lab.find(tmp_path / "lab") is None
    assert not [proc for proc in Path("/proc").iterdir() if proc.name.isdigit() and str(tmp_path) in _cmdline(proc)]


def test_a_lab_whose_kernel_panics_is_seen_as_gone_though_its_sockets_close_first(
    request: pytest.FixtureRequest,
) -> None:
    """A second lab (in a shared directory: the lab's /tmp is its own) whose kernel is made to panic.

    QEMU closes the agent's connection before its process ends, so a check made as the connection drops still finds
    the lab running; :meth:`Lab.answers` waits until one or the other is certain. The lab plugin's retry relies on it.
    """
    root = request.config.rootpath
    where = root / ".qmpnet-lab" / f"panic-{uuid.uuid4().hex[:8]}"
    where.mkdir(parents=True)
    lab: Lab | None = None
    try:
        lab = Lab.ensure(directory=where, shares=[root])
        assert lab.answers(within=10)
        with pytest.raises(LabError, match="lab's agent"):
            lab.run(["sh", "-c", "echo c > /proc/sysrq-trigger"], timeout=60)
        assert not lab.answers(within=60)
        assert Lab.find(where) is None  # its QEMU ended (the deadline did not decide)
        assert not [proc for proc in Path("/proc").iterdir() if proc.name.isdigit() and str(where) in _cmdline(proc)]
        assert "Kernel panic" in lab.console_tail(200)
    finally:
        if lab is not None and Lab.find(where) is not None:
            lab.stop()
        shutil.rmtree(where, ignore_errors=True)


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:  # gone meanwhile
        return ""
