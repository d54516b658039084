"""The fleet on a real distributed broker: a two-node RabbitMQ cluster on this machine (Debian's package, MQTT
plugin, nodes of their own, no system service). The controller connects to node 1, the client to node 2, and a
hot-add goes through; QEMU's own view shows the NIC once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import pytest
from aux_qmp import aux_args, aux_monitor
from mqtt_fixtures import (
    RABBITMQ,
    Epmd,
    Qemu,
    RabbitMQ,
    Serve,
    client_settings,
    fresh_root,
    need_rabbitmq,
    scratch,
    wait_online,
)

from qmpnet.client import Client

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = [pytest.mark.integration]


class Cluster:
    def __init__(self, work: Path) -> None:
        self.epmd = Epmd(work)
        self.first = RabbitMQ(work, self.epmd, name="one")
        self.second = RabbitMQ(work, self.epmd, name="two")

    def start(self) -> None:
        self.epmd.start()
        for node in (self.first, self.second):  # both boot at once: ~10 s each on two cores
            node.boot()
        self.first.wait_mqtt()
        self.second.wait_mqtt()
        self.second.join(self.first)
        members = self.first.ctl("cluster_status", "--formatter", "json")
        assert self.second.node in members, members

    def stop(self) -> None:
        self.second.stop()
        self.first.stop()
        self.epmd.stop()


@pytest.fixture
def cluster() -> Iterator[tuple[Cluster, Path]]:
    need_rabbitmq()
    with scratch("qmpnet-rabbit-cluster-") as work:
        nodes = Cluster(work)
        try:
            nodes.start()
            yield nodes, work
        finally:
            nodes.stop()


async def test_controller_on_node_one_client_on_node_two_a_hot_add_goes_through(
    cluster: tuple[Cluster, Path],
) -> None:
    nodes, work = cluster
    (work / "vm").mkdir()
    vm = Qemu(work / "vm" / "vm.qmp", extra=aux_args(work / "vm"))
    root = fresh_root()
    serve = Serve(work, nodes.first.url, "h1", {"vm": vm.qmp}, root=root, protocol=RABBITMQ.protocol)
    try:
        vm.start()
        serve.start()
        await wait_online(serve, nodes.first.url, guests_connected=["vm"], protocol=3)
        async with Client(settings=client_settings(nodes.second.url, RABBITMQ, root), timeout=15) as client:
            nic = await client.add_nic("h1", "vm", {"model": "e1000", "id": "across"})
            assert (nic.id, nic.model) == ("across", "e1000")
            assert [n.id for n in await client.list_nics("h1", "vm")] == ["across"]
            assert [g.name for g in await client.guests("h1")] == ["vm"]
        async with aux_monitor(work / "vm") as aux:  # QEMU's own view, not qmpnet's
            peripherals = cast("list[dict[str, str]]", await aux.execute("qom-list", {"path": "/machine/peripheral"}))
        assert [p["name"] for p in peripherals if p["type"].startswith("child<")] == ["across"]
        assert serve.running, serve.describe()
    finally:
        serve.stop()
        vm.stop()
