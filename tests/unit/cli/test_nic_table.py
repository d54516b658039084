"""The readable NIC table of ``qmpnet nic list``: a pending removal says since when, in UTC."""

from __future__ import annotations

import calendar
import time

from qmpnet.cli.tables import nic_table
from qmpnet.core.model import Nic


def nic(nic_id: str, **more: object) -> dict[str, object]:
    fields = {"id": nic_id, "model": "e1000", "mac": None, "netdev": None, "backend": None, "pci": None, "link": "up",
              "state": "active", **more}  # fmt: skip
    return Nic.model_validate(fields).model_dump(mode="json")


def test_a_pending_removal_shows_since_when_in_utc() -> None:
    today = time.time()
    earlier = calendar.timegm((2026, 12, 1, 23, 59, 58, 0, 0, 0))
    rows = nic_table([
        nic("a1"),
        nic("p1", state="removal_pending", pending_since=today),
        nic("p2", state="removal_pending", pending_since=earlier),
        nic("p3", state="removal_pending"),  # device_del not answered yet
    ]).splitlines()
    assert rows[1].endswith("active")
    assert rows[2].endswith(f"removal_pending since {time.strftime('%H:%M:%SZ', time.gmtime(today))}")
    assert rows[3].endswith("removal_pending since 2026-12-01 23:59:58Z")
    assert rows[4].endswith("removal_pending")
