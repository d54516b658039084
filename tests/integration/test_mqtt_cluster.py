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
    Qemu,
    RabbitCluster,
    Serve,
    client_settings,
    fresh_root,
    rabbit_cluster,
    wait_online,
)

from qmpnet.client import Client

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = [pytest.mark.integration]


@pytest.fixture
def cluster() -> Iterator[tuple[RabbitCluster, Path]]:
    with rabbit_cluster("qmpnet-rabbit-cluster-", ("one", "two")) as nodes:
        yield nodes


async def test_controller_on_node_one_client_on_node_two_a_hot_add_goes_through(
    cluster: tuple[RabbitCluster, Path],
) -> None:
    nodes, work = cluster
    (work / "vm").mkdir()
    vm = Qemu(work / "vm" / "vm.qmp", extra=aux_args(work / "vm"))
    root = fresh_root()
    serve = Serve(work, nodes.nodes[0].url, "h1", {"vm": vm.qmp}, root=root, protocol=RABBITMQ.protocol)
    try:
        vm.start()
        serve.start()
        await wait_online(serve, nodes.nodes[0].url, guests_connected=["vm"], protocol=3)
        async with Client(settings=client_settings(nodes.nodes[1].url, RABBITMQ, root), timeout=15) as client:
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
