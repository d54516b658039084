"""One guest's request router: requests into the guest's lane, de-duplicated and replayed by transaction.

- **Requests never wait for a connection.** A request for a guest that is not connected is answered
  ``guest_unavailable`` at once; one for a connected guest goes straight into the guest's lane, with no ``await``
  before the lane is entered, so requests for one guest run in arrival order and different guests in parallel.
  The one exception is a guest's first connection attempt: requests the broker kept for the controller while it
  was down arrive right at start-up, and they wait (in arrival order, at most ``qmp.connect_timeout``) until
  that attempt has ended rather than all being refused.
- **De-duplication by transaction.** MQTT QoS 1 is at-least-once: a repeated ``transaction`` within the window
  (``mqtt.dedup_window``) is answered with the first answer (awaited if still running), never applied twice. In
  memory for concurrent repeats; across restarts from the operation records of the guest's state store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from qmpnet.api.wire.envelopes import (
    ErrorResponse,
    ModelList,
    NicAddRequest,
    NicCaptureRequest,
    NicDelRequest,
    NicLinkRequest,
    NicList,
    NicListRequest,
    NicUpdateRequest,
    OkResponse,
    Response,
    SlotsRequest,
    error_response,
    ok_response,
    parse_request,
    transaction_of,
)
from qmpnet.errors import GuestUnavailable, OutcomeUnknown, QmpnetError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydantic import BaseModel

    from qmpnet.guest.guest import Guest
    from qmpnet.serve.supervisor import Supervisor

__all__ = ["RequestRouter"]

log = logging.getLogger(__name__)


class _Dedup:
    """First answers by transaction id, kept ``window`` seconds after their request arrived."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._answers: OrderedDict[str, tuple[float, asyncio.Future[Response]]] = OrderedDict()

    def get(self, transaction: str) -> asyncio.Future[Response] | None:
        now = time.monotonic()
        while self._answers:
            arrived, answer = next(iter(self._answers.values()))
            if now - arrived <= self._window or not answer.done():
                break
            self._answers.popitem(last=False)
        entry = self._answers.get(transaction)
        if entry is None or entry[1].cancelled():  # the first request was cancelled (shutdown): nothing to repeat
            return None
        return entry[1]

    def remember(self, transaction: str) -> asyncio.Future[Response]:
        answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._answers[transaction] = (time.monotonic(), answer)
        return answer


class RequestRouter:
    """Answers the requests for the guest that ``supervisor`` keeps connected.

    Args:
        supervisor: The guest's supervisor: its lane while connected, its state, and its first attempt's end.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self.name = supervisor.name
        settings = supervisor.fleet.settings
        self._dedup = _Dedup(settings.mqtt.dedup_window)
        self._first_wait = settings.qmp.connect_timeout

    async def handle(self, op: str, payload: Mapping[str, Any]) -> Response:
        """Answer one request for this guest (de-duplicated by transaction)."""
        if not self._supervisor.settled.is_set():  # see "Requests never wait for a connection" above
            with contextlib.suppress(TimeoutError):  # before the record is read: it needs the guest connected
                async with asyncio.timeout(self._first_wait):
                    await self._supervisor.settled.wait()
        transaction = transaction_of(payload)
        if transaction is None:
            return await self._answer(op, payload, transaction)
        first = self._dedup.get(transaction)
        if first is not None:
            log.info(
                "guest %s: transaction %s repeated: first answer again",
                self.name,
                transaction,
                extra={"guest": self.name, "transaction": transaction},
            )
            return await asyncio.shield(first)
        recorded = self._recorded(transaction)
        if recorded is not None:
            log.info("guest %s: transaction %s was run before: its recorded outcome again", self.name, transaction,
                     extra={"guest": self.name, "transaction": transaction})
            return recorded
        answer = self._dedup.remember(transaction)
        try:
            response = await self._answer(op, payload, transaction)
        except BaseException:
            answer.cancel()
            raise
        answer.set_result(response)
        return response

    def _recorded(self, transaction: str) -> Response | None:
        """The answer to a transaction the guest's record says was run (by this process or one before it)."""
        guest = self._supervisor.guest
        operation = guest.operation(transaction) if guest is not None else None
        if operation is None:
            return None
        if operation.outcome is None:
            return error_response(transaction, OutcomeUnknown(
                f"transaction {transaction} was interrupted (qmpnet stopped while it ran); the guest was recovered "
                "since: list the NICs to see its state"
            ))
        if operation.outcome.get("status") == "ok":
            return OkResponse[Any](transaction=transaction, status="ok", data=operation.outcome.get("data"))
        return ErrorResponse.model_validate({"transaction": transaction, **operation.outcome})

    async def _answer(self, op: str, payload: Mapping[str, Any], transaction: str | None) -> Response:
        try:
            request = parse_request(op, "guest", payload)
            supervisor = self._supervisor
            guest = supervisor.guest
            if guest is None:
                raise GuestUnavailable(f"guest {self.name} is {supervisor.state}: {supervisor.problem}")
            data = await self._run(guest, request, transaction)
        except QmpnetError as err:
            return error_response(transaction, err)
        return ok_response(transaction, data)

    async def _run(  # noqa: PLR0911 - one return per op
        self, guest: Guest, request: BaseModel, transaction: str | None
    ) -> BaseModel:
        match request:
            case NicAddRequest(nic=spec, verify=verify):
                return await guest.add_nic(spec, operation=transaction, verify=verify)
            case NicDelRequest(id=nic_id, timeout=timeout, verify=verify):
                return await guest.remove_nic(nic_id, timeout=timeout, operation=transaction, verify=verify)
            case NicLinkRequest(id=nic_id, up=up, verify=verify):
                return await guest.set_link(nic_id, up=up, operation=transaction, verify=verify)
            case NicUpdateRequest(update=update):
                return await guest.update_nic(update, operation=transaction)
            case NicCaptureRequest(id=nic_id, action=action, file=file):
                return await guest.capture(nic_id, action, file)
            case NicListRequest():
                nics = await guest.list_nics()
                self._supervisor.nics.replace(nics)
                return NicList(nics=nics)
            case SlotsRequest():
                room = await guest.slots()
                self._supervisor.capacity_read(room)
                return room
            case _:
                return ModelList(models=await guest.models())
