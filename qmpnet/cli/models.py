"""``qmpnet models``: the NIC models a guest's QEMU offers."""

from __future__ import annotations

from qmpnet.cli.connect import GuestCall
from qmpnet.cli.options import guest_options
from qmpnet.cli.output import format_rows


@guest_options()
def models(call: GuestCall) -> None:
    """List the NIC models this QEMU offers (the old -net nic,model=?)."""
    found = call.run(lambda guest: guest.models())

    def table() -> str:
        rows = [("MODEL", "BUS", "SPEED", "HOTPLUG", "DESCRIPTION")]
        rows += [(m.name, m.bus, m.speed or "-", "yes" if m.hotplug else "no", m.description) for m in found]
        return format_rows(rows)

    call.emit({"models": [m.model_dump(mode="json") for m in found]}, table)
