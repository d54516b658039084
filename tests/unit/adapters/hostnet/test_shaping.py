"""The pure rules of the host side of live changes: tc layouts, VLAN entries, IFB marks, and the pyroute2 calls.

The pyroute2 calls recorded here by a fake ``IPRoute`` are the ones whose netlink messages were compared byte for
byte with iproute2's (``tc qdisc add ... netem delay 100ms 10ms loss 1%``, ``bridge vlan add ... vid 10 pvid
untagged``, ``vid 100-199``) under strace; tests/integration/test_hostnet_wire.py repeats that comparison on any
machine with strace, because the CI kernel has neither netem nor VLAN filtering to run them for real.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from pyroute2.netlink.rtnl.tcmsg import sched_netem

from qmpnet.adapters.hostnet import shaping
from qmpnet.adapters.hostnet.bridgeports import PVID, UNTAGGED, _infos, compress, entries_for, tap_held_by, vlan_of
from qmpnet.adapters.hostnet.links import LinkInfo, ifb_mark, parse_ifb_mark
from qmpnet.adapters.hostnet.shaping import TcLayout, layout_of, shape_of
from qmpnet.core.model import Shape, Vlan

if TYPE_CHECKING:
    from pathlib import Path

KB = 1024


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        (None, None),
        (Shape(rate=5_000_000), TcLayout(rate=625_000, burst=16 * KB, limit=31_250 + 16 * KB)),
        (Shape(rate=10_000_000_000), TcLayout(rate=1_250_000_000, burst=12_500_000, limit=75_000_000)),
        (Shape(rate=1_000_000, burst=20_000), TcLayout(rate=125_000, burst=20_000, limit=6_250 + 20_000)),
        (Shape(delay=100_000, jitter=10_000, loss=1.0),
         TcLayout(delay=100_000, jitter=10_000, loss=42_949_673, netem_limit=18_334)),
        (Shape(loss=100.0), TcLayout(loss=2**32 - 1)),
        (Shape(delay=0), None),
        (Shape(rate=5_000_000, delay=100_000),
         TcLayout(rate=625_000, burst=16 * KB, limit=31_250 + 16 * KB, delay=100_000, netem_limit=1000)),
    ],
)  # fmt: skip
def test_layouts(shape: Shape | None, layout: TcLayout | None) -> None:
    assert layout_of(shape, latency=0.05) == layout


@pytest.mark.parametrize(
    "shape",
    [Shape(rate=5_000_000), Shape(rate=2_000_000, burst=20_000), Shape(delay=100_000, jitter=10_000, loss=1.0),
     Shape(loss=100.0), Shape(rate=5_000_000, delay=250, loss=0.5)],
)
def test_a_layout_stands_for_the_shape_it_was_made_from(shape: Shape) -> None:
    layout = layout_of(shape, latency=0.05)
    back = shape_of(layout)
    assert back is not None
    expected = (shape.rate, shape.delay or None, shape.jitter, pytest.approx(shape.loss) if shape.loss else None)
    assert (back.rate, back.delay or None, back.jitter, back.loss) == expected


def test_ifb_marks_name_the_tap_by_index_and_name() -> None:
    assert ifb_mark(7, "vnet3") == "qmpnet:ifb:7:vnet3"
    assert parse_ifb_mark("qmpnet:ifb:7:vnet3") == (7, "vnet3")
    for alias in (None, "", "qmpnet:tap:vm1/x", "qmpnet:ifb:x:vnet3", "qmpnet:ifb:7:", "other"):
        assert parse_ifb_mark(alias) is None
    tap = LinkInfo(index=12, name="vnet0", kind="tun", alias=None, master=None, up=True, mtu=1500)
    assert shaping.ifb_name(tap) == "qmpifb12"


# ------------------------------------------------------------------------------------------------ VLAN rules


@pytest.mark.parametrize(
    ("vlan", "default_pvid", "entries"),
    [
        (None, 1, ((1, 1, PVID | UNTAGGED),)),
        (None, 0, ()),
        (Vlan(access=10), 1, ((10, 10, PVID | UNTAGGED),)),
        (Vlan(trunks=["20", "100-199", "150-250"]), 1, ((20, 20, 0), (100, 250, 0))),
    ],
)
def test_vlan_entries(vlan: Vlan | None, default_pvid: int, entries: tuple[tuple[int, int, int], ...]) -> None:
    assert entries_for(vlan, default_pvid) == entries
    back = vlan_of(entries, default_pvid)
    assert (back.ranges() if back else None) == (vlan.ranges() if vlan else None)


def test_the_kernels_single_entries_are_compressed_into_ranges() -> None:
    vids = [(1, PVID | UNTAGGED | 0x20), (5, 0), (6, 0), (7, 0), (9, 0), (10, UNTAGGED), (11, UNTAGGED)]
    assert compress(vids) == ((1, 1, PVID | UNTAGGED), (5, 7, 0), (9, 9, 0), (10, 11, UNTAGGED))


def test_a_mix_qmpnet_does_not_make_is_no_vlan() -> None:
    assert vlan_of(((1, 1, PVID | UNTAGGED), (5, 7, 0)), 1) is None


def test_vlan_filter_arguments_are_the_ones_checked_against_iproute2() -> None:
    assert _infos(10, 10, PVID | UNTAGGED) == [{"vid": 10, "flags": 6}]
    assert _infos(100, 199, 0) == [{"vid": "100-199"}]
    assert _infos(10, 12, UNTAGGED) == [{"vid": 10, "flags": 4}, {"vid": 11, "flags": 4}, {"vid": 12, "flags": 4}]


# ------------------------------------------------------------------------------------------------ tc calls


class RecordingRoute:
    """Just enough of pyroute2's IPRoute for _build: records ``tc`` and ``link`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.created: dict[str, int] = {}

    def tc(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("tc", args, kwargs))

    def link(self, command: str, **kwargs: Any) -> list[Any]:
        self.calls.append(("link", (command,), kwargs))
        if command == "add":
            self.created[kwargs["ifname"]] = 100 + len(self.created)
        return []

    def link_lookup(self, ifname: str) -> list[int]:
        return [self.created[ifname]] if ifname in self.created else []


def test_the_full_layout_is_netem_over_tbf_on_the_tap_and_tbf_on_its_ifb(monkeypatch: pytest.MonkeyPatch) -> None:
    ipr = RecordingRoute()

    def fake_find(_: Any, name: str) -> LinkInfo | None:
        index = ipr.created.get(name)
        return LinkInfo(index=index, name=name, kind="ifb", alias=None, master=None, up=False, mtu=1500) \
            if index is not None else None

    monkeypatch.setattr(shaping, "find_link", fake_find)
    tap = LinkInfo(index=3, name="vnet0", kind="tun", alias=None, master=9, up=True, mtu=1500)
    layout = layout_of(Shape(rate=5_000_000, delay=100_000, jitter=10_000, loss=1.0), latency=0.05)
    shaping._build(ipr, tap, layout)
    tc = [(args, kwargs) for name, args, kwargs in ipr.calls if name == "tc"]
    assert [(args[0], args[1]) for args, _ in tc] == [("add", "netem"), ("add", "tbf"), ("add", "tbf"),
                                                      ("add", "ingress"), ("add-filter", "u32")]
    (_, netem), (child_args, child), (ifb_args, _), _, (_, redirect) = tc
    assert netem["parent"] == 0xFFFFFFFF
    assert (child_args[2], child_args[3], child["parent"]) == (3, shaping.CHILD, shaping.ROOT | 1)
    assert ifb_args[2] == 100  # the IFB
    assert child["rate"] == 625_000
    assert redirect["action"] == [{"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": 100}]
    assert ("link", ("set",), {"index": 100, "ifalias": "qmpnet:ifb:3:vnet0", "state": "up"}) in ipr.calls
    # What pyroute2 makes of our netem arguments is the struct iproute2 sends for
    # `tc qdisc add dev d0 root handle 71: netem delay 100ms 10ms loss 1%` (recorded with strace).
    fields = sched_netem.get_parameters(netem)
    iproute2 = {"delay": 0x17D784, "jitter": 0x02625A, "loss": 0x028F5C29}
    assert {k: int(fields[k]) for k in ("delay", "jitter")} == {k: iproute2[k] for k in ("delay", "jitter")}
    assert abs(int(fields["loss"]) - iproute2["loss"]) <= 1


def test_the_tap_a_process_holds_is_read_from_its_fdinfo(tmp_path: Path) -> None:
    fdinfo = tmp_path / "4242" / "fdinfo"
    fdinfo.mkdir(parents=True)
    (fdinfo / "23").write_text("pos:\t0\nflags:\t0104002\nmnt_id:\t25\nino:\t1066\niff:\tvnet3\n")
    (fdinfo / "5").write_text("pos:\t0\nflags:\t02\nmnt_id:\t25\nino:\t17\n")
    assert tap_held_by(4242, 23, proc=tmp_path) == "vnet3"
    assert tap_held_by(4242, 5, proc=tmp_path) is None  # not a tun fd
    assert tap_held_by(4242, 99, proc=tmp_path) is None
    assert tap_held_by(None, 23, proc=tmp_path) is None
