#!/usr/bin/env python3
"""A whole fleet on one machine, driven by desired documents, losing a broker node on the way.

Three "hosts" (network namespaces ``<tag>-h1`` .. ``h3`` on a bridge of their own), each running ``qmpnet serve``
with two booted test guests; a three-node RabbitMQ cluster (private nodes, quorum-queue sessions) that the hosts
reach over the bridge; and an orchestrator that uses nothing but :mod:`qmpnet.client`'s public API:

1. it publishes a desired document for each of the six guests and waits until every guest's status says
   ``converged`` (the time is printed);
2. it SIGKILLs the broker node that the first host's controller and the orchestrator itself are connected to,
   publishes the next generation of every document at once, and waits until all six guests have converged to it
   (the time is printed again): controllers and orchestrator move to the next node of their broker lists;
3. it checks QEMU's NICs (as the controllers read them afresh) against the documents, and takes everything down.

One command, as root (see docs/fleet.md)::

    python3 contrib/fleet/fleet.py

It needs qemu-system-x86, rabbitmq-server, iproute2 and the test guest image (``python3 -m qmpnet.testguest
build``; built on first use). Whatever happens, everything it created is removed: processes, namespaces, bridge,
files. Exit status 0 when the fleet converged both times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from qmpnet.client import Client
from qmpnet.settings import MqttSettings
from qmpnet.testguest import TestMachine, ensure_image
from qmpnet.testguest.services import Epmd, Process, RabbitMQ, short_dir

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

HOSTS = ("h1", "h2", "h3")
GUESTS = ("vm1", "vm2")
NODES = ("one", "two", "three")
#: Sessions as quorum queues: a controller's session and its queued requests outlive the node it was on.
QUORUM = "mqtt.durable_queue_type = quorum"
#: Quick reconnects, so that a lost node costs a fraction of a second (the defaults are 0.5 s .. 10 s).
RECONNECT = {"reconnect_min": 0.2, "reconnect_max": 2.0, "keepalive": 5}
TOPIC_ROOT = "fleet"
#: No busy-waiting of idle Erlang schedulers (on a small machine three nodes would take the guests' CPU).
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"


def say(line: str) -> None:
    """One line of progress on stdout, at once."""
    print(line, flush=True)  # noqa: T201 - the script's output


def run(*argv: str) -> None:
    """Run a host command; fail with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.254.0.0/16 that no interface of this machine uses."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for third in range(1, 255):
        net = ipaddress.IPv4Network(f"10.254.{third}.0/24")
        if f" 10.254.{third}." not in used:
            return net
    raise RuntimeError("no free /24 in 10.254.0.0/16")


def desired(host: str, guest: str, generation: int) -> dict[str, Any]:
    """The desired document of ``guest`` at ``generation``: two NICs, then a third and one link down."""
    nics: list[dict[str, Any]] = [
        {"id": "lan0", "model": "virtio", "backend": {"type": "user"}},
        {"id": "lan1", "model": "e1000", "backend": {"type": "user"}},
    ]
    if generation >= 2:
        nics[1]["link"] = "down"
        nics.append({"id": "lan2", "model": "rtl8139", "backend": {"type": "user"}})
    del host, guest  # every guest gets the same shape here; a real orchestrator would look them up
    return {"generation": generation, "nics": nics}


class Fleet:
    """Everything the example starts, in the order it is taken down again (reversed)."""

    def __init__(self, tag: str, work: Path) -> None:
        self.tag = tag
        self.work = work
        self.subnet = free_subnet()
        self.gateway = str(self.subnet[1])
        self.bridge = f"{tag}br"
        self.undo: list[tuple[str, Any]] = []  # (what, how to undo it), in creation order
        self.nodes: list[RabbitMQ] = []
        self.machines: dict[tuple[str, str], TestMachine] = {}
        self.serves: dict[str, Process] = {}

    def netns(self, host: str) -> str:
        """The network namespace of ``host``."""
        return f"{self.tag}-{host}"

    # ------------------------------------------------------------------------------------------------ network

    def network(self) -> None:
        """A bridge with the gateway address, and one namespace per host on it (``eth0``)."""
        run("ip", "link", "add", self.bridge, "type", "bridge")
        self.undo.append(("bridge", lambda: run("ip", "link", "del", self.bridge)))
        run("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for index, host in enumerate(HOSTS, start=1):
            ns = self.netns(host)
            run("ip", "netns", "add", ns)
            self.undo.append(("netns", lambda ns=ns: run("ip", "netns", "del", ns)))
            veth = f"{self.tag}v{index}"
            run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "link", "set", veth, "master", self.bridge, "up")
            run("ip", "-n", ns, "addr", "add", f"{self.subnet[10 + index]}/{self.subnet.prefixlen}", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    # ------------------------------------------------------------------------------------------------ brokers

    def cluster(self) -> None:
        """Three RabbitMQ nodes in one cluster, listening on loopback and on the bridge."""
        epmd = Epmd(self.work)
        epmd.start()
        self.undo.append(("epmd", epmd.stop))
        listen = f"mqtt.listeners.tcp.2 = {self.gateway}:{{port}}"
        self.nodes = [RabbitMQ(self.work, epmd, name=name, conf=f"{QUORUM}\n{listen}") for name in NODES]
        for node in self.nodes:  # idle Erlang schedulers spin by default: three nodes would starve the guests
            node.env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = ERL_ARGS
        started = time.monotonic()
        self.undo.append(("the broker nodes", self.stop_nodes))
        for node in self.nodes:
            node.boot()
        for node in self.nodes:
            node.wait_mqtt()
        for node in self.nodes[1:]:
            node.join(self.nodes[0])
        say(f"broker cluster: {len(self.nodes)} nodes up in {time.monotonic() - started:.1f} s")

    async def stop_nodes(self) -> None:
        """Stop every node that runs, all at once (``rabbitmqctl stop`` takes seconds each)."""
        await asyncio.gather(*(asyncio.to_thread(node.stop) for node in self.nodes))

    def urls(self, *, first: int, via_bridge: bool) -> list[str]:
        """Every node's URL, starting with node ``first`` (0-based), as a host or the orchestrator reaches it."""
        host = self.gateway if via_bridge else "127.0.0.1"
        ordered = self.nodes[first:] + self.nodes[:first]
        return [f"mqtt://{host}:{node.port}" for node in ordered]

    # ------------------------------------------------------------------------------------------------ hosts

    async def guests(self) -> None:
        """Boot two test guests per host, QEMU inside the host's namespace, all at once."""
        image = await asyncio.to_thread(ensure_image)
        for host in HOSTS:
            for guest in GUESTS:
                workdir = self.work / host / guest
                workdir.mkdir(parents=True)
                vm = TestMachine(image, name=f"{host}-{guest}", workdir=workdir)
                vm.command_line = ["ip", "netns", "exec", self.netns(host), *vm.command_line]
                self.machines[host, guest] = vm
        for vm in self.machines.values():
            self.undo.append((vm.name, vm.stop))
        started = time.monotonic()
        await asyncio.gather(*(vm.start(timeout=180) for vm in self.machines.values()))
        say(f"guests: {len(self.machines)} booted in {time.monotonic() - started:.1f} s")

    def controllers(self) -> None:
        """``qmpnet serve`` in every host's namespace; host ``hN`` tries node N first, then the others in turn."""
        for index, host in enumerate(HOSTS):
            argv = ["ip", "netns", "exec", self.netns(host), sys.executable, "-m", "qmpnet", "serve",
                    "--controller-id", host]  # fmt: skip
            for url in self.urls(first=index, via_bridge=True):
                argv += ["--broker", url]
            for guest in GUESTS:
                argv += ["--guest", f"{guest}={self.machines[host, guest].qmp_path}"]
            env = {
                **os.environ,
                "QMPNET_STATE_DIR": str(self.work / host / "state"),
                "QMPNET_MQTT__TOPIC_ROOT": TOPIC_ROOT,
                **{f"QMPNET_MQTT__{key.upper()}": str(value) for key, value in RECONNECT.items()},
            }
            serve = Process(f"serve-{host}", self.work / host)
            serve.spawn(argv, env=env)
            self.undo.append((serve.name, serve.stop))
            self.serves[host] = serve

    async def teardown(self) -> None:
        """Undo everything, newest first; report what could not be undone, and go on."""
        for what, how in reversed(self.undo):
            try:
                result = how()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as err:  # noqa: BLE001 - cleanup goes on whatever one step says
                say(f"cleanup: {what}: {err}")
        self.undo.clear()


async def wait_converged(client: Client, generation: int, deadline: float) -> None:
    """Poll every controller's ``guests`` until each guest's desired status is converged at ``generation``."""
    while True:
        behind: list[str] = []
        for host in HOSTS:
            try:
                infos = {info.name: info for info in await client.guests(host)}
            except Exception as err:  # noqa: BLE001 - a controller still moving: look again
                behind.append(f"{host}: {err}")
                continue
            for guest in GUESTS:
                status = infos[guest].desired if guest in infos else None
                if status is None or status.generation != generation or not status.converged or status.errors:
                    behind.append(f"{host}/{guest}: {status.model_dump() if status else 'no desired status'}")
        if not behind:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("not converged in time: " + "; ".join(behind))
        await asyncio.sleep(0.2)


async def wait_guests_connected(client: Client, deadline: float) -> None:
    """Until every controller answers and says both its guests are connected.

    Asked with a short timeout: a request published before a controller's very first connection is not kept.
    """
    while True:
        ready = True
        for host in HOSTS:
            try:
                listed = await client.call(host, None, "guests", timeout=2)
            except Exception:  # noqa: BLE001 - not there yet
                listed = {}
            connected = {g["name"] for g in listed.get("guests", []) if g["state"] == "connected"}
            ready = ready and connected >= set(GUESTS)
        if ready:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the controllers did not report their guests connected in time")
        await asyncio.sleep(0.2)


async def orchestrate(fleet: Fleet, timeout: float) -> None:
    """Publish the documents, wait for convergence, lose a node, publish again, wait again; check QEMU."""
    settings = MqttSettings(topic_root=TOPIC_ROOT, **RECONNECT)
    async with Client(fleet.urls(first=0, via_bridge=False), settings=settings, timeout=30) as client:
        started = time.monotonic()
        await wait_guests_connected(client, started + timeout)
        say(f"controllers: all {len(HOSTS)} online with their guests {time.monotonic() - started:.1f} s later")
        started = time.monotonic()
        for host in HOSTS:
            for guest in GUESTS:
                await client.set_desired(host, guest, desired(host, guest, 1))
        await wait_converged(client, 1, started + timeout)
        say(f"converged: {len(HOSTS) * len(GUESTS)} guests to generation 1 in {time.monotonic() - started:.2f} s")
        lost = fleet.nodes[0]
        started = time.monotonic()
        await asyncio.to_thread(lost.kill)
        say(f"killed broker node {lost.node} (SIGKILL): h1's controller and this orchestrator were on it")
        for host in HOSTS:
            for guest in GUESTS:
                await client.set_desired(host, guest, desired(host, guest, 2))
        await wait_converged(client, 2, started + timeout)
        say(f"converged again: generation 2 in {time.monotonic() - started:.2f} s after the node was killed")
        for host in HOSTS:
            for guest in GUESTS:
                found = {nic.id: nic for nic in await client.list_nics(host, guest)}
                wanted = {nic["id"] for nic in desired(host, guest, 2)["nics"]}
                if set(found) != wanted or found["lan1"].link != "down":
                    raise RuntimeError(f"{host}/{guest}: QEMU has {sorted(found)}, wanted {sorted(wanted)}")
        say("checked: every guest's QEMU has exactly its desired NICs")


async def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; 0 when the fleet converged twice, 1 otherwise (everything is removed either way)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--timeout", type=float, default=120, help="seconds each convergence may take")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say("error: run as root (network namespaces, a bridge)")
        return 2
    tag = f"qf{secrets.token_hex(2)}"
    work = short_dir(f"qmpnet-{tag}-")
    fleet = Fleet(tag, work)
    say(f"fleet {tag}: work directory {work}, subnet {fleet.subnet}")
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        if task is not None:
            loop.add_signal_handler(signum, task.cancel)
    started = time.monotonic()
    try:
        fleet.network()
        await asyncio.gather(asyncio.to_thread(fleet.cluster), fleet.guests())
        fleet.controllers()
        say(f"up: {len(NODES)} broker nodes, {len(HOSTS)} hosts, {len(fleet.machines)} guests booted "
            f"in {time.monotonic() - started:.1f} s")  # fmt: skip
        await orchestrate(fleet, args.timeout)
    except (Exception, asyncio.CancelledError) as err:  # noqa: BLE001 - reported, then everything is removed
        say(f"error: {err}")
        for serve in fleet.serves.values():
            say(serve.describe())
        return 1
    finally:
        await fleet.teardown()
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
        say("cleaned up: processes, namespaces, bridge and files removed")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
