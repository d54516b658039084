"""``qmpnet slots``: how many more NICs of each model a guest can take now, and where."""

from __future__ import annotations

from qmpnet.cli.connect import GuestCall
from qmpnet.cli.options import guest_options
from qmpnet.cli.output import format_rows


@guest_options()
def slots(call: GuestCall) -> None:
    """Count the free PCI places per NIC model (root ports, bridge slots, pci.0 slots), as hot-add would use them.

    A model with none left gets a line saying what to add to the QEMU command line.
    """
    room = call.run(lambda guest: guest.slots())

    def table() -> str:
        rows = [("MODEL", "FREE", "ROOT PORTS", "BRIDGE SLOTS", "PCI.0 SLOTS", "WHERE")]
        rows += [
            (m.model, str(m.free), str(m.root_ports), str(m.bridge_slots), str(m.root_slots),
             ", ".join(f"{b.bus}:{b.free}" for b in m.buses if b.free) or "-")
            for m in room.models
        ]  # fmt: skip
        advice = [f"{m.model}: {m.advice}" for m in room.models if m.advice]
        return "\n".join([f"machine {room.machine}", format_rows(rows), *advice])

    call.emit(room, table)
