"""``verify`` without a guest agent is refused before anything is sent (the real adapter, the fake monitor)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

import qmpnet
from qmpnet.errors import InvalidRequest

if TYPE_CHECKING:
    from pathlib import Path

    from fakeqmp import FakeQmp

    from qmpnet.settings import Settings


@pytest.mark.parametrize("mode", [True, "address"])
async def test_verify_without_an_agent_changes_nothing(fake: FakeQmp, fast: Settings, mode: bool | str) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        for call in (
            guest.add_nic({"model": "e1000"}, verify=mode),  # type: ignore[arg-type]
            guest.set_link("e1", up=False, verify=True),
            guest.remove_nic("e1", verify=True),
        ):
            with pytest.raises(InvalidRequest) as caught:
                await call
            assert caught.value.field == "verify"
            assert "no guest agent" in caught.value.message
    assert fake.changes() == []


async def test_an_agent_socket_nobody_answers_on_is_refused_naming_verify(
    fake: FakeQmp, fast: Settings, sockdir: Path
) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast, qga=str(sockdir / "nobody.qga")) as guest:
        with pytest.raises(InvalidRequest) as caught:
            await guest.add_nic({"model": "e1000"}, verify=True)
    assert caught.value.field == "verify"
    assert "nobody.qga" in caught.value.message
    assert fake.changes() == []


async def test_a_vfio_nic_cannot_be_verified(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        with pytest.raises(InvalidRequest, match="vfio"):
            await guest.add_nic({"backend": {"type": "vfio", "host": "0000:03:00.0"}}, verify=True)
    assert fake.changes() == []


async def test_the_agent_is_looked_for_when_a_call_needs_it_once_per_read(fake: FakeQmp, fast: Settings) -> None:
    def lookups() -> int:
        return sum(c.name == "query-chardev" for c in fake.commands())

    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        await guest.add_nic({"model": "e1000"})
        assert lookups() == 0  # connecting and a plain hot-add need no agent
        await guest.list_nics()  # the guest's own view, if an agent is there
        assert lookups() == 1
        await guest.list_nics()
        with pytest.raises(InvalidRequest):
            await guest.set_link("e1", up=False, verify=True)
        assert lookups() == 1  # not found: not looked for again until the guest is read afresh
        await guest.recover()
        await guest.list_nics()
        assert lookups() == 2
