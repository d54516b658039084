"""The flag tables of ``nic add`` and ``nic set``, and the objects their values are turned into."""

from __future__ import annotations

import pytest

from qmpnet.cli.flags import Flag, Given, LinkArg, flag_table
from qmpnet.cli.nic_flags import ADD_FLAGS, SET_FLAGS, BackendType, build_spec, build_update
from qmpnet.errors import InvalidRequest


def given(flags: tuple[Flag, ...], **values: object) -> Given:
    return Given({flag.param: values.get(flag.param, flag.default) for flag in flags})


def test_a_table_line_is_one_flag() -> None:
    [flag] = flag_table("""
        hub  int  --hub  N  Hub number for --backend hubport (the old vlan=n).
    """)
    assert flag == Flag("hub", int | None, None, "--hub", "N", "Hub number for --backend hubport (the old vlan=n).")
    [switch] = flag_table("restrict  switch  --restrict  -  user: isolate the guest from the host.")
    assert (switch.kind, switch.default, switch.metavar) == (bool, False, None)


def test_the_commands_share_the_filter_flags_and_name_each_flag_once() -> None:
    for flags in (ADD_FLAGS, SET_FLAGS):
        assert len({flag.param for flag in flags}) == len(flags)
        assert len({flag.decl for flag in flags}) == len(flags)
    shared = {flag.decl for flag in ADD_FLAGS} & {flag.decl for flag in SET_FLAGS}
    assert shared == {"--bridge", "--network", "--link", "--mtu", "--filter", "--filter-ipv4", "--filter-ipv6",
                      "--no-filter-mac", "--filter-dhcp-server"}  # fmt: skip


def test_nic_add_flags_make_a_spec() -> None:
    assert build_spec(given(ADD_FLAGS)) == {
        "model": "virtio-net-pci", "link": "up", "backend": {"type": "user", "hostfwd": [], "restrict": False},
    }  # fmt: skip
    bridge = given(ADD_FLAGS, backend=BackendType.bridge, bridge="br0", nic_id="n1", mtu=1400, filter_ipv4=["none"])
    spec = build_spec(bridge)
    assert spec == {
        "model": "virtio-net-pci", "link": "up", "backend": {"type": "bridge", "bridge": "br0", "helper": False},
        "id": "n1", "mtu": 1400, "filter": {"mac": True, "dhcp_server": False, "ipv4": []},
    }  # fmt: skip
    vfio = build_spec(given(ADD_FLAGS, backend=BackendType.vfio, pci_host="0000:03:00.0"))
    assert vfio == {"backend": {"type": "vfio", "host": "0000:03:00.0", "rebind": False}}  # no model, no link


def test_nic_set_flags_make_an_update() -> None:
    update = build_update("n1", given(SET_FLAGS, trunks="10, 20", rate="10mbit", loss="1%", link=LinkArg.down))
    assert update == {"id": "n1", "vlan": {"trunks": ["10", "20"]}, "shape": {"rate": "10mbit", "loss": "1%"},
                      "link": "down"}  # fmt: skip
    assert build_update("n1", given(SET_FLAGS, no_filter=True, no_shape=True)) == {
        "id": "n1", "shape": None, "filter": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("values", "flags"),
    [({"vlan": 5, "no_vlan": True}, "--vlan/--no-vlan"), ({"bridge": "a", "network": "b"}, "--bridge/--network"),
     ({"no_shape": True, "delay": "1ms"}, "--no-shape/--delay"),
     ({"no_filter": True, "filter_on": True}, "--no-filter")],
)  # fmt: skip
def test_conflicting_set_flags_are_refused(values: dict[str, object], flags: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        build_update("n1", given(SET_FLAGS, **values))
    assert refused.value.message.startswith(flags)
