"""Tables for PCI placement on ``pc`` and ``q35``: automatic choice, explicit bus/addr, the errors, and capacity."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qmpnet.core import placement
from qmpnet.core.placement import CAPACITY_MODELS, PciBus, PciTopology, Placement, advice, capacity, place
from qmpnet.errors import Conflict, InvalidRequest, NoFreeSlot, NotFound, Unsupported

PC_BUILTIN = {(0, 0): "i440FX", (1, 0): "PIIX3", (1, 1): "piix3-ide", (1, 3): "PIIX4_PM"}
Q35_BUILTIN = {(0, 0): "mch", (31, 0): "ICH9-LPC", (31, 2): "ich9-ahci", (31, 3): "ICH9-SMB"}


def pc(used: dict[tuple[int, int], str] | None = None, *extra: PciBus) -> PciTopology:
    return PciTopology("pc", (PciBus("pci.0", "root", hotplug=True, used={**PC_BUILTIN, **(used or {})}), *extra))


def q35(*buses: PciBus) -> PciTopology:
    ports = {(n, 0): b.name for n, b in enumerate(buses, start=1) if b.kind == "root_port"}
    return PciTopology("q35", (PciBus("pcie.0", "root", hotplug=False, used={**Q35_BUILTIN, **ports}), *buses))


def port(name: str, holder: str | None = None) -> PciBus:
    return PciBus(name, "root_port", hotplug=True, used={(0, 0): holder} if holder else {})


def bridge(name: str, used: dict[tuple[int, int], str] | None = None) -> PciBus:
    return PciBus(name, "pci_bridge", hotplug=True, used=used or {})


ALL_PC_SLOTS = {(slot, 0): f"dev{slot}" for slot in range(2, 32)}
ALL_BRIDGE_SLOTS = {(slot, 0): f"nic{slot}" for slot in range(1, 32)}


# ------------------------------------------------------------------------------------------------------ pc


@pytest.mark.parametrize("model", ["virtio-net-pci", "e1000", "e1000e", "rtl8139"])
def test_pc_first_free_slot_on_pci0(model: str) -> None:
    assert place(model, pc()) == Placement("pci.0", 2, 0)


def test_pc_skips_used_slots_and_functions() -> None:
    # A slot with any function in use is not free: slot 1 only has functions 0, 1 and 3 used.
    topology = pc({(2, 0): "rtl8139", (3, 0): "e1", (5, 0): "v1"})
    assert place("virtio-net-pci", topology) == Placement("pci.0", 4, 0)


def test_pc_slot_with_only_a_higher_function_used_is_not_free() -> None:
    assert place("e1000", pc({(2, 4): "x"})) == Placement("pci.0", 3, 0)


def test_pc_all_slots_used() -> None:
    with pytest.raises(NoFreeSlot) as info:
        place("virtio-net-pci", pc(ALL_PC_SLOTS))
    assert info.value.code == "no_free_slot"
    assert "-device pci-bridge" in info.value.message
    assert "virtio-net-pci" in info.value.message


def test_pc_explicit_addr_free() -> None:
    assert place("e1000", pc(), addr=(0x1F, 0)) == Placement("pci.0", 0x1F, 0)


def test_pc_explicit_addr_in_use_names_holder() -> None:
    with pytest.raises(Conflict) as info:
        place("e1000", pc({(3, 0): "e1"}), addr=(3, 0))
    assert info.value.field == "nic.addr"
    assert "in use by e1" in info.value.message
    assert "0x3" in info.value.message


def test_pc_explicit_addr_on_builtin_device() -> None:
    with pytest.raises(Conflict, match="PIIX3"):
        place("e1000", pc(), addr=(1, 0))


def test_pc_explicit_slot_zero_cannot_be_used() -> None:
    with pytest.raises(InvalidRequest) as info:
        place("e1000", PciTopology("pc", (PciBus("pci.0", "root", hotplug=True),)), addr=(0, 0))
    assert info.value.field == "nic.addr"


def test_pc_explicit_unknown_bus() -> None:
    with pytest.raises(NotFound) as info:
        place("e1000", pc(), bus="br9")
    assert info.value.field == "nic.bus"
    assert "'br9'" in info.value.message
    assert "pci.0" in info.value.message  # lists the buses that exist


def test_pc_explicit_bus_without_addr_takes_first_free_slot_there() -> None:
    topology = pc({}, bridge("br1", {(1, 0): "n1"}))
    assert place("virtio-net-pci", topology, bus="br1") == Placement("br1", 2, 0)


def test_pc_explicit_bus_and_addr() -> None:
    assert place("rtl8139", pc({}, bridge("br1")), bus="br1", addr=(7, 0)) == Placement("br1", 7, 0)


def test_pc_automatic_placement_stays_on_pci0_even_with_a_bridge() -> None:
    assert place("rtl8139", pc({}, bridge("br1"))) == Placement("pci.0", 2, 0)


# ----------------------------------------------------------------------------------------------------- q35


@pytest.mark.parametrize("model", ["virtio-net-pci", "e1000e"])
def test_q35_pcie_models_take_first_free_root_port(model: str) -> None:
    topology = q35(port("rp1", "v1"), port("rp2"), port("rp3"))
    assert place(model, topology) == Placement("rp2", 0, 0)


@pytest.mark.parametrize("model", ["virtio-net-pci", "e1000e"])
def test_q35_pcie_models_never_go_behind_a_bridge(model: str) -> None:
    topology = q35(port("rp1", "pcibr1"), bridge("pcibr1"), port("rp2"))
    assert place(model, topology) == Placement("rp2", 0, 0)


def test_q35_no_free_root_port_says_what_to_add() -> None:
    with pytest.raises(NoFreeSlot) as info:
        place("virtio-net-pci", q35(port("rp1", "v1"), port("rp2", "v2")))
    message = info.value.message
    assert "-device pcie-root-port,id=rp3,chassis=3,bus=pcie.0" in message


@pytest.mark.parametrize("model", ["rtl8139", "e1000"])
def test_q35_legacy_models_go_into_a_bridge_slot(model: str) -> None:
    topology = q35(port("rp1"), port("rp2", "pcibr1"), bridge("pcibr1"))
    assert place(model, topology) == Placement("pcibr1", 1, 0)


def test_q35_legacy_model_skips_used_bridge_slots() -> None:
    topology = q35(port("rp1", "pcibr1"), bridge("pcibr1", {(1, 0): "r1", (2, 0): "r2"}))
    assert place("rtl8139", topology) == Placement("pcibr1", 3, 0)


def test_q35_legacy_model_uses_the_second_bridge_when_the_first_is_full() -> None:
    topology = q35(port("rp1", "b1"), bridge("b1", ALL_BRIDGE_SLOTS), port("rp2", "b2"), bridge("b2"))
    assert place("e1000", topology) == Placement("b2", 1, 0)


@pytest.mark.parametrize("model", ["rtl8139", "e1000"])
def test_q35_legacy_model_without_bridge_says_to_add_pcie_pci_bridge(model: str) -> None:
    # A free root port exists, but automatic placement follows the PCIe guidelines and does not use it.
    with pytest.raises(NoFreeSlot) as info:
        place(model, q35(port("rp1"), port("rp2")))
    assert "pcie-pci-bridge" in info.value.message
    assert model in info.value.message
    assert "bus=<root port>" in info.value.message


def test_q35_legacy_model_with_full_bridge() -> None:
    with pytest.raises(NoFreeSlot, match="pcie-pci-bridge"):
        place("rtl8139", q35(port("rp1", "b1"), bridge("b1", ALL_BRIDGE_SLOTS)))


@pytest.mark.parametrize("model", ["rtl8139", "e1000"])
def test_q35_explicit_root_port_honoured_for_legacy_model(model: str) -> None:
    topology = q35(port("rp1", "v1"), port("rp2"), bridge("pcibr1"))
    assert place(model, topology, bus="rp2") == Placement("rp2", 0, 0)


def test_q35_explicit_used_root_port() -> None:
    with pytest.raises(NoFreeSlot, match="'rp1'"):
        place("virtio-net-pci", q35(port("rp1", "v1")), bus="rp1")


def test_q35_explicit_root_port_slot_other_than_zero() -> None:
    with pytest.raises(InvalidRequest) as info:
        place("virtio-net-pci", q35(port("rp1")), bus="rp1", addr=(1, 0))
    assert info.value.field == "nic.addr"


def test_q35_explicit_bridge_slot_zero_is_reserved() -> None:
    with pytest.raises(InvalidRequest, match="slot 0x0"):
        place("rtl8139", q35(port("rp1", "b1"), bridge("b1")), bus="b1", addr=(0, 0))


def test_q35_pcie0_is_not_hot_pluggable() -> None:
    with pytest.raises(Unsupported) as info:
        place("virtio-net-pci", q35(port("rp1")), bus="pcie.0")
    assert info.value.code == "unsupported"
    assert info.value.field == "nic.bus"
    assert "pcie.0" in info.value.message


def test_q35_explicit_addr_without_bus_means_pcie0() -> None:
    with pytest.raises(Unsupported) as info:
        place("virtio-net-pci", q35(port("rp1")), addr=(5, 0))
    assert info.value.field == "nic.addr"


def test_q35_unknown_bus_lists_the_hot_pluggable_ones() -> None:
    with pytest.raises(NotFound) as info:
        place("virtio-net-pci", q35(port("rp1"), port("rp2")), bus="rp7")
    assert "rp1, rp2" in info.value.message
    assert "pcie.0" not in info.value.message.split("hot-pluggable buses:")[1]


# ------------------------------------------------------------------------------------ capacity: the same rules

CAPACITY = [
    # Each: a topology, a model, and its free count: in all, on root ports, on bridges, on pci.0.
    pytest.param(pc(), "virtio-net-pci", (30, 0, 0, 30), id="pc-empty-pcie-model"),
    pytest.param(pc(), "rtl8139", (30, 0, 0, 30), id="pc-empty-legacy-model"),
    pytest.param(pc({(2, 0): "a", (3, 4): "b"}), "e1000", (28, 0, 0, 28), id="pc-a-used-function-takes-its-slot"),
    pytest.param(pc(None, bridge("br1")), "e1000", (30, 0, 0, 30), id="pc-bridges-are-not-automatic"),
    pytest.param(pc(ALL_PC_SLOTS), "e1000e", (0, 0, 0, 0), id="pc-full"),
    pytest.param(q35(port("rp1"), port("rp2")), "virtio-net-pci", (2, 2, 0, 0), id="q35-two-free-ports"),
    pytest.param(q35(port("rp1", "n1"), port("rp2")), "e1000e", (1, 1, 0, 0), id="q35-one-port-taken"),
    pytest.param(q35(port("rp1"), port("rp2")), "rtl8139", (0, 0, 0, 0), id="q35-legacy-never-into-a-port"),
    pytest.param(q35(port("rp1"), bridge("br", {(1, 0): "x"})), "e1000", (30, 0, 30, 0), id="q35-bridge-slots"),
    pytest.param(q35(port("rp1", "x"), bridge("br")), "virtio-net-pci", (0, 0, 0, 0), id="q35-pcie-never-on-bridge"),
    pytest.param(q35(bridge("b1", ALL_BRIDGE_SLOTS), bridge("b2")), "rtl8139", (31, 0, 31, 0), id="q35-two-bridges"),
    pytest.param(q35(PciBus("rpx", "root_port", hotplug=False)), "virtio-net-pci", (0, 0, 0, 0),
                 id="q35-port-without-hotplug"),
]  # fmt: skip


@pytest.mark.parametrize(("topology", "model", "expected"), CAPACITY)
def test_capacity_counts(topology: PciTopology, model: str, expected: tuple[int, int, int, int]) -> None:
    room = capacity(topology, (model,))
    assert room.machine == topology.machine
    (counted,) = room.models
    assert (counted.free, counted.root_ports, counted.bridge_slots, counted.root_slots) == expected
    assert sum(bus.free for bus in counted.buses) == counted.free
    assert (counted.advice is None) == (counted.free > 0)


@pytest.mark.parametrize(("topology", "model", "expected"), CAPACITY)
def test_capacity_is_exactly_what_placement_finds_room_for(
    topology: PciTopology, model: str, expected: tuple[int, int, int, int]
) -> None:
    # Place and occupy until placement refuses: it succeeds exactly `free` times, first on the first bus listed,
    # and each placement takes one from the count; the refusal carries the advice the count gave.
    free = expected[0]
    for placed in range(free):
        counted = capacity(topology, (model,)).models[0]
        assert counted.free == free - placed
        where = place(model, topology)
        assert where.bus == next(bus.bus for bus in counted.buses if bus.free)
        topology = _occupy(topology, where)
    counted = capacity(topology, (model,)).models[0]
    assert counted.free == 0
    with pytest.raises(NoFreeSlot) as refused:
        place(model, topology)
    assert refused.value.message == f"no free PCI place for {model}: {counted.advice}"


def test_capacity_counts_every_model_by_default_each_alone() -> None:
    room = capacity(q35(port("rp1"), bridge("br")))
    assert [m.model for m in room.models] == list(CAPACITY_MODELS)
    # Shared places: each model alone would get the one root port, so the counts do not add up.
    assert {m.model: m.free for m in room.models} == {"virtio-net-pci": 1, "e1000e": 1, "e1000": 31, "rtl8139": 31}



@pytest.mark.parametrize(("topology", "model", "expected"), CAPACITY)
def test_free_count_and_first_free_are_of_the_free_slots(
    topology: PciTopology, model: str, expected: tuple[int, int, int, int]
) -> None:
    for bus in topology.buses:
        assert bus.free_count() == len(bus.free_slots())
        free = bus.free_slots()
        assert bus.first_free() == (free[0] if free else None)


def test_a_count_made_before_is_given_again_and_equals_a_fresh_one(monkeypatch: pytest.MonkeyPatch) -> None:
    topologies = [param.values[0] for param in CAPACITY if isinstance(param.values[0], PciTopology)]
    first = [capacity(topology) for topology in topologies]
    # The same buses built anew: the very same object (nothing built, nothing to compare field by field).
    for topology, counted in zip(topologies, first, strict=True):
        assert capacity(replace(topology, buses=tuple(replace(bus) for bus in topology.buses))) is counted
    monkeypatch.setattr(placement, "_COUNTED", {})
    assert [capacity(topology) for topology in topologies] == first


def test_counts_differ_by_everything_they_depend_on() -> None:
    # The same number of free slots on a bus of another name, kind or hot-plug, or another machine or models.
    base = q35(port("rp1"), bridge("br", {(1, 0): "x"}))
    variants = [
        q35(port("rp2"), bridge("br", {(1, 0): "x"})),
        q35(port("rp1"), bridge("br2", {(1, 0): "x"})),
        q35(PciBus("rp1", "root_port", hotplug=False), bridge("br", {(1, 0): "x"})),
        q35(port("rp1"), bridge("br", {(2, 0): "x"})),
    ]
    for variant in variants:
        assert capacity(variant) == placement._count(variant, CAPACITY_MODELS)
    assert capacity(base, ("e1000",)) != capacity(base, ("rtl8139",))
    assert capacity(variants[0]) != capacity(base)
    assert capacity(variants[1]) != capacity(base)
    assert capacity(variants[2]) != capacity(base)
    assert capacity(variants[3]) == capacity(base)  # another slot taken on the bridge: the same count


def test_counts_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "_COUNTED", {})
    monkeypatch.setattr(placement, "_COUNTED_LIMIT", 3)
    for slot in range(2, 12):
        capacity(pc({(slot, 0): "x"}, bridge(f"br{slot}")))
        assert len(placement._COUNTED) <= 3

ADVICE = [
    pytest.param(pc(ALL_PC_SLOTS), "virtio-net-pci", "-device pci-bridge,id=br1,chassis_nr=1", id="pc"),
    pytest.param(q35(port("rp1", "x")), "e1000e", "-device pcie-root-port,id=rp2,chassis=2,bus=pcie.0", id="q35-pcie"),
    pytest.param(q35(port("rp1")), "rtl8139", "-device pcie-pci-bridge,id=pcibr2,bus=rp2", id="q35-legacy"),
]


@pytest.mark.parametrize(("topology", "model", "fix"), ADVICE)
def test_advice_says_what_to_add_and_is_the_errors_and_the_counts(topology: PciTopology, model: str, fix: str) -> None:
    said = advice(model, topology)
    assert fix in said
    assert model in said
    assert capacity(topology, (model,)).models[0].advice == said
    with pytest.raises(NoFreeSlot) as refused:
        place(model, topology)
    assert refused.value.message.endswith(said)


def _occupy(topology: PciTopology, where: Placement) -> PciTopology:
    buses = tuple(
        replace(bus, used={**bus.used, (where.slot, where.function): "new"}) if bus.name == where.bus else bus
        for bus in topology.buses
    )
    return replace(topology, buses=buses)
