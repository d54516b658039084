"""The outbox keeps what the broker has not acknowledged, in order, and restarts a session answers-first."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from qmpnet.adapters.mqtt.outbox import Outbox, Outgoing
from qmpnet.api.wire.envelopes import NicList

if TYPE_CHECKING:
    import pytest


def answer(n: int) -> Outgoing:
    return Outgoing(f"r/{n}", f'{{"n":{n}}}'.encode(), "answer")


def event(n: int) -> Outgoing:
    return Outgoing(f"e/{n}", b"{}", "event")


def state(topic: str, payload: bytes = b"{}") -> Outgoing:
    return Outgoing(topic, payload, "state")


async def drain(outbox: Outbox, *, ack: bool = True) -> list[str]:
    """Every message the sender would take now, in order (acknowledged unless ``ack`` is false)."""
    taken: list[str] = []
    while True:
        try:
            async with asyncio.timeout(0):  # only what is there already: the queue never waits here
                seq, item = await outbox.next()
        except TimeoutError:
            return taken
        taken.append(item.topic)
        if ack:
            outbox.acknowledged(seq)


async def test_messages_go_out_in_the_order_they_were_put() -> None:
    outbox = Outbox(limit=100)
    outbox.session_started()
    for item in (answer(1), state("s/a"), event(1), answer(2), event(2)):
        outbox.put(item)
    assert await drain(outbox) == ["r/1", "s/a", "e/1", "r/2", "e/2"]
    await asyncio.wait_for(outbox.settled(), 1)


async def test_while_the_broker_is_away_nothing_is_lost_and_state_is_latest_only() -> None:
    outbox = Outbox(limit=100)
    outbox.put(state("s/status", b"online"))  # before the first session
    outbox.session_started()
    assert await drain(outbox) == ["s/status"]
    outbox.session_ended()
    outbox.put(state("s/nics", b"1"))
    outbox.put(event(1))
    outbox.put(answer(1))
    outbox.put(state("s/nics", b"2"))
    outbox.session_started()
    assert await drain(outbox) == ["r/1", "s/status", "s/nics", "e/1"]
    assert outbox.retained("s/nics") == b"2"


async def test_what_was_not_acknowledged_is_sent_again_in_the_next_session() -> None:
    outbox = Outbox(limit=100)
    outbox.session_started()
    outbox.put(answer(1))
    outbox.put(event(1))
    outbox.put(state("s/a"))
    assert await drain(outbox, ack=False) == ["r/1", "e/1", "s/a"]
    outbox.session_ended()
    outbox.session_started()
    assert await drain(outbox) == ["r/1", "s/a", "e/1"]
    await asyncio.wait_for(outbox.settled(), 1)


async def test_a_deletion_is_kept_until_acknowledged_then_forgotten() -> None:
    outbox = Outbox(limit=100)
    outbox.session_started()
    outbox.put(state("s/gone", b"{}"))
    await drain(outbox)
    outbox.put(state("s/gone", b""))
    assert await drain(outbox, ack=False) == ["s/gone"]
    outbox.session_ended()
    outbox.session_started()
    seq, item = await outbox.next()
    assert (item.topic, item.payload()) == ("s/gone", b"")
    outbox.acknowledged(seq)
    assert outbox.retained("s/gone") is None
    outbox.session_ended()
    outbox.session_started()
    assert await drain(outbox) == []


async def test_clears_are_best_effort_and_models_are_serialised_when_sent() -> None:
    outbox = Outbox(limit=100)
    outbox.put(Outgoing("req/1", b"", "clear"))  # no session: dropped
    nics = NicList(nics=[])
    outbox.put(Outgoing("s/nics", nics, "state"))
    outbox.session_started()
    _, item = await outbox.next()
    assert (item.topic, item.retain, item.qos) == ("s/nics", True, 1)
    assert item.payload() == nics.model_dump_json().encode()
    clear = Outgoing("req/1", b"", "clear")
    assert (clear.retain, clear.qos) == (True, 0)
    assert (answer(1).retain, event(1).retain) == (False, False)


async def test_a_full_outbox_drops_the_oldest_events_first(caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(limit=10)
    for n in range(5):
        outbox.put(answer(n))
    for n in range(8):
        outbox.put(event(n))
    outbox.session_started()
    assert await drain(outbox) == [*(f"r/{n}" for n in range(5)), *(f"e/{n}" for n in range(3, 8))]
    assert "dropping the oldest" in caplog.text
    assert "3 answers or events were dropped" in caplog.text


async def test_a_change_within_the_interval_waits_for_its_end_as_the_latest_state() -> None:
    outbox = Outbox(limit=100, state_interval=0.05)
    outbox.session_started()
    outbox.put(state("s/nics", b"1"))
    outbox.put(event(1))
    outbox.put(state("s/nics", b"2"))  # within 0.05 s of the first: held back
    outbox.put(state("s/nics", b"3"))
    assert await drain(outbox) == ["s/nics", "e/1"]
    settled = asyncio.ensure_future(outbox.settled())
    await asyncio.sleep(0)
    assert not settled.done()  # the held-back state is still to be sent
    async with asyncio.timeout(2):
        seq, item = await outbox.next()
    assert (item.topic, item.payload()) == ("s/nics", b"3")
    outbox.acknowledged(seq)
    await asyncio.wait_for(settled, 1)


async def test_a_new_session_sends_the_held_back_state_at_once() -> None:
    outbox = Outbox(limit=100, state_interval=3600)
    outbox.session_started()
    outbox.put(state("s/nics", b"1"))
    outbox.put(state("s/nics", b"2"))
    assert await drain(outbox, ack=False) == ["s/nics"]
    outbox.session_ended()
    outbox.session_started()
    assert await drain(outbox) == ["s/nics"]
    assert outbox.retained("s/nics") == b"2"
    outbox.put(state("s/nics", b"3"))  # the session's first change of the topic: at once
    assert await drain(outbox) == ["s/nics"]
    await asyncio.wait_for(outbox.settled(), 1)


async def test_a_stopping_controller_sends_what_was_held_back_and_holds_nothing_more() -> None:
    outbox = Outbox(limit=100, state_interval=3600)
    outbox.session_started()
    outbox.put(state("s/status", b"online"))
    outbox.put(state("s/nics", b"1"))
    outbox.put(state("s/nics", b"2"))
    assert await drain(outbox) == ["s/status", "s/nics"]
    outbox.flush_state(hold_no_more=True)
    outbox.put(state("s/status", b"offline"))  # within the interval, yet at once: nothing is held any more
    assert await drain(outbox) == ["s/nics", "s/status"]  # the held-back list first, then offline
    assert (outbox.retained("s/nics"), outbox.retained("s/status")) == (b"2", b"offline")
    await asyncio.wait_for(outbox.settled(), 1)
