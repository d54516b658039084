"""Stuck unplugs on real QEMU: ``pending_since``, one ``device_del`` per removal, and ``unplug_stuck`` told once.

A QEMU started with ``-S`` runs no guest OS, so nothing ever acknowledges its ACPI or PCIe unplug requests: every
removal stays pending, which is exactly a stuck guest. QEMU itself says what it was sent and what it answered: its
``handle_qmp_command`` and ``monitor_qmp_respond`` trace events (``-trace``, logged into a file with ``-D``) are a
transcript of every QMP exchange, on every monitor. That is the evidence that a repeated ``nic/del`` and a
restarted controller send no second ``device_del`` (which QEMU 7.2 and later would refuse: "already in the process
of unplug"). A ``system_reset`` completes pending unplugs in QEMU, which is what ``unplug_stuck`` advises: the test
follows the advice and sees the removal finished.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import needs
import pytest
from aux_qmp import aux_args, aux_monitor, hmp
from mqtt_fixtures import Mosquitto, Probe, Qemu, Serve, scratch, started, wait_online
from qemu_info import QEMU

import qmpnet

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.integration]

#: QEMU's trace events for a QMP command received and for everything sent back (answers, errors, events).
TRACE_EVENTS = ("handle_qmp_command", "monitor_qmp_respond")
IN_PROGRESS = "already in the process of unplug"


@functools.cache
def qemu_traces_qmp() -> bool:
    """Whether this QEMU has the QMP trace events (a build with a trace backend; Debian's logs them with -D)."""
    listed = subprocess.run([QEMU, "-trace", "help"], capture_output=True, text=True, timeout=30, check=False)
    return all(event in listed.stdout for event in TRACE_EVENTS)


def qemu_args(workdir: Path) -> list[str]:
    """A second monitor (aux.qmp) and QEMU's QMP transcript in ``workdir/qmp-trace.log``."""
    needs.require(qemu_traces_qmp(), f"{QEMU} has no QMP trace events ({', '.join(TRACE_EVENTS)})")
    traces = [arg for event in TRACE_EVENTS for arg in ("-trace", f"enable={event}")]
    return [*aux_args(workdir), *traces, "-D", str(workdir / "qmp-trace.log")]


@dataclass(frozen=True)
class Transcript:
    """What QEMU's trace says it received and answered."""

    requests: list[dict[str, Any]]
    answers: list[str]

    @classmethod
    def read(cls, workdir: Path) -> Transcript:
        requests: list[dict[str, Any]] = []
        answers: list[str] = []
        for line in (workdir / "qmp-trace.log").read_text(errors="replace").splitlines():
            if line.startswith("handle_qmp_command ") and " req: " in line:
                requests.append(json.loads(line.split(" req: ", 1)[1]))
            elif line.startswith("monitor_qmp_respond ") and " resp: " in line:
                answers.append(line.split(" resp: ", 1)[1])
        return cls(requests, answers)

    def device_dels(self, nic_id: str) -> int:
        """How many ``device_del`` of ``nic_id`` QEMU received, from any client."""
        return sum(1 for r in self.requests if r.get("execute") == "device_del" and r["arguments"] == {"id": nic_id})

    def refused_as_in_progress(self) -> list[str]:
        return [answer for answer in self.answers if IN_PROGRESS in answer]


async def cli(*args: str, state_dir: Path | None = None) -> tuple[int, str, str]:
    """Run ``qmpnet ARGS`` (by default in the session's state directory, which comes through the environment)."""
    env = {**os.environ, "QMPNET_STATE_DIR": str(state_dir)} if state_dir is not None else None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpnet", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_repeated_removal_sends_one_device_del_and_pending_since_outlives_the_process() -> None:
    with scratch("qmpnet-stuck-") as work:
        vm = Qemu(work / "vm1.qmp", extra=qemu_args(work))
        with started(vm):
            qmp = str(vm.qmp)
            async with qmpnet.connect(qmp) as guest:
                nic = await guest.add_nic({"model": "virtio", "id": "stuck"})
                before = time.time()
                assert (await guest.remove_nic(nic.id, timeout=0.5)).state == "removal_pending"
                for wait in (0.2, 0.0):  # repeated: each answers pending and sends QEMU nothing
                    assert await guest.remove_nic(nic.id, timeout=wait) == qmpnet.RemoveResult(
                        id=nic.id, state="removal_pending"
                    )
                (listed,) = [n for n in await guest.list_nics() if n.id == nic.id]
                since = listed.pending_since
                assert listed.state == "removal_pending"
                assert since is not None
                assert before <= since <= time.time()
            # Another process (the CLI) reads the same pending_since from the record, and repeats the removal.
            rc, out, err = await cli("nic", "list", "--qmp", qmp, "--json")
            assert rc == 0, err
            assert {n["id"]: n["pending_since"] for n in json.loads(out)["nics"]}[nic.id] == since
            rc, out, err = await cli("nic", "list", "--qmp", qmp)
            assert rc == 0, err
            assert f"removal_pending since {time.strftime('%H:%M:%SZ', time.gmtime(since))}" in out
            rc, out, err = await cli("nic", "del", nic.id, "--qmp", qmp, "--timeout", "0.2")
            assert (rc, out.strip()) == (0, f"{nic.id}: removal_pending"), err
            transcript = Transcript.read(work)
            assert transcript.device_dels(nic.id) == 1, transcript.requests
            assert transcript.refused_as_in_progress() == []
            # What QEMU refuses, for the record: a second device_del of its own (through the second monitor).
            async with aux_monitor(work) as aux:
                with pytest.raises(Exception, match=IN_PROGRESS):
                    await aux.execute("device_del", {"id": nic.id})
            assert len(Transcript.read(work).refused_as_in_progress()) == 1
            assert f"{nic.netdev}:" in await hmp(work, "info network")  # the backend waits for the unplug


async def test_unplug_stuck_over_mqtt_once_across_a_restart_and_its_advice_works() -> None:
    with scratch("qmpnet-stuck-mqtt-") as work:
        broker = Mosquitto(work)
        vm = Qemu(work / "vm1.qmp", extra=qemu_args(work))
        with started(broker, vm):
            serve = Serve(work, broker.url, "s1", {"vm1": vm.qmp}, env={"QMPNET_UNPLUG__STUCK_AFTER": "1"})
            with started(serve):
                await wait_online(serve, broker.url, guests_connected=["vm1"])
                await _stuck_over_mqtt(work, broker, serve)


async def _stuck_over_mqtt(work: Path, broker: Mosquitto, serve: Serve) -> None:
    base = f"{serve.base}/guest/vm1"

    def ok(answer: dict[str, Any]) -> Any:
        assert answer["status"] == "ok", answer
        return answer["data"]

    async with Probe(broker.url) as probe:
        await probe.subscribe(f"{base}/event/#", f"{base}/nics")
        netdev = ok(await probe.call(f"{base}/request/nic/add", {"nic": {"model": "virtio", "id": "stuck"}}))["netdev"]
        since_mark = probe.mark()
        pending = ok(await probe.call(f"{base}/request/nic/del", {"id": "stuck", "timeout": 0}))
        assert pending == {"id": "stuck", "state": "removal_pending"}
        state = await probe.one(f"{base}/nics", lambda m: _pending_since(m.json, "stuck") is not None, since=since_mark)
        since = _pending_since(state.json, "stuck")
        # Repeated: the same answer, nothing sent to QEMU.
        again = ok(await probe.call(f"{base}/request/nic/del", {"id": "stuck", "timeout": 0.2}))
        assert again == {"id": "stuck", "state": "removal_pending"}
        stuck = await probe.one(f"{base}/event/unplug_stuck", since=since_mark, timeout=15)
        assert stuck.json["id"] == "stuck"
        assert stuck.json["nic"]["pending_since"] == since
        assert stuck.json["message"].startswith("NIC stuck: ")
        assert "system_reset" in stuck.json["message"]
        # The CLI on this host reaches the guest through the controller (its control socket): the same figure.
        rc, out, err = await cli("nic", "list", "--qmp", str(work / "vm1.qmp"), "--json", state_dir=work / "state-s1")
        assert rc == 0, err
        assert _pending_since(json.loads(out), "stuck") == since

        serve.restart()
        await wait_online(serve, broker.url, guests_connected=["vm1"])
        restarted = probe.mark()
        assert _pending_since(ok(await probe.call(f"{base}/request/nic/list", {})), "stuck") == since
        # A removal stuck after the restart is told; the one told before is not told again (it would have come
        # first: it was due at once).
        ok(await probe.call(f"{base}/request/nic/add", {"nic": {"model": "virtio", "id": "later"}}))
        ok(await probe.call(f"{base}/request/nic/del", {"id": "later", "timeout": 0}))
        await probe.one(f"{base}/event/unplug_stuck", lambda m: m.json["id"] == "later", since=restarted, timeout=15)
        assert [m.json["id"] for m in probe.received(f"{base}/event/unplug_stuck")] == ["stuck", "later"]

        transcript = Transcript.read(work)
        assert (transcript.device_dels("stuck"), transcript.device_dels("later")) == (1, 1), transcript.requests
        assert transcript.refused_as_in_progress() == []

        # The advice: a reset completes the unplugs, and the controller finishes the removals by itself.
        reset = probe.mark()
        async with aux_monitor(work) as aux:
            await aux.execute("system_reset")
        removed = await probe.wait(f"{base}/event/nic_removed", since=reset, count=2)
        assert sorted(m.json["id"] for m in removed) == ["later", "stuck"]
        await probe.one(f"{base}/nics", lambda m: not {"stuck", "later"} & _ids(m.json), since=reset)
        assert f"{netdev}:" not in await hmp(work, "info network")


def _ids(nics: dict[str, Any]) -> set[str]:
    return {n["id"] for n in nics["nics"]}


def _pending_since(nics: dict[str, Any], nic_id: str) -> float | None:
    found = [n.get("pending_since") for n in nics["nics"] if n["id"] == nic_id]
    return found[0] if found else None
