"""The local control socket: the direct-mode CLI reaches a guest that ``qmpnet serve`` on this host holds.

QEMU serves one QMP client per monitor, and ``qmpnet serve`` keeps its guests' monitors for good. So that a user
never has to care which process holds a monitor, the controller listens on ``<state_dir>/control.sock`` and the
CLI asks it first: one JSON line ``{"address": "/run/vm1.qmp", "op": "nic/add", "payload": {...}}`` in, one
answer line out, exactly the envelope the MQTT API answers with. A controller that does not serve the address
answers ``not_found`` on the field ``address``, and the CLI then connects to QEMU itself.

The socket is the controller's own authority on the host, so it is for root (and the controller's own user)
only: mode 0600 in a 0700 directory, and every peer's credentials are checked (``SO_PEERCRED``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from pydantic import BaseModel, Field, ValidationError

from qmpnet.api.wire.envelopes import ModelList, NicList, data_of, error_response, ok_response, to_wire
from qmpnet.core.model import (
    Capacity,
    CaptureResult,
    ModelInfo,
    Nic,
    NicSpec,
    NicUpdate,
    RemoveResult,
    Verify,
    parse_nic_spec,
    parse_nic_update,
)
from qmpnet.core.model_base import Frozen
from qmpnet.errors import GuestUnavailable, InvalidRequest, NotFound, OutcomeUnknown, QmpnetError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from qmpnet.api.wire.envelopes import Response

__all__ = ["ControlGuest", "ControlTarget", "controller_serves", "serve_control"]

log = logging.getLogger(__name__)

_LINE_LIMIT: Final = 256 * 1024
#: The control socket's own op: does the controller serve this address?
_SERVES: Final = "serves"


class _Request(Frozen):
    address: str
    op: str
    payload: dict[str, Any] = Field(default_factory=dict)


class _Served(BaseModel):
    guest: str
_UCRED: Final = struct.Struct("3i")


class ControlTarget(Protocol):
    """What the control socket needs of the controller."""

    def serves(self, address: str) -> str | None:
        """The name of the guest whose QMP socket is ``address``, if this controller serves it."""
        ...

    async def handle(self, guest: str | None, op: str, payload: Mapping[str, Any]) -> Response:
        """Answer one request for ``guest``, as over MQTT."""
        ...


async def serve_control(path: Path, target: ControlTarget) -> asyncio.Server:
    """Listen on ``path`` (replacing a stale socket) and answer each connection's request through ``target``."""
    _remove_stale(path)

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _trusted(writer):
                writer.write(to_wire(error_response(None, InvalidRequest("control: only root may use this socket"))))
                return
            response = await _answer(reader, target)
            writer.write(to_wire(response) + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as err:
            log.info("control: a client went away: %s", err)
        finally:
            writer.close()

    old_umask = os.umask(0o177)  # the socket is born 0600: no window in which others could connect
    try:
        return await asyncio.start_unix_server(session, path=str(path), limit=_LINE_LIMIT)
    finally:
        os.umask(old_umask)


def _remove_stale(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def _answer(reader: asyncio.StreamReader, target: ControlTarget) -> Response:
    line = await reader.readline()
    try:
        request = _Request.model_validate_json(line)
    except ValidationError as err:
        return error_response(None, InvalidRequest(f"control: malformed request ({err.error_count()} errors)",
                                                   field="control"))
    guest = target.serves(request.address)
    if guest is None:
        return error_response(None, not_served(request.address))
    if request.op == _SERVES:
        return ok_response(None, _Served(guest=guest))
    return await target.handle(guest, request.op, request.payload)


def _trusted(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid in (0, os.getuid())


async def _call(path: Path, address: str, op: str, payload: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """One request over the control socket; its answer envelope.

    Raises:
        GuestUnavailable: No controller listens at ``path``.
        OutcomeUnknown: The controller did not answer within ``timeout``.
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=_LINE_LIMIT), timeout)
    except (OSError, TimeoutError) as err:
        raise GuestUnavailable(f"no controller listens on {path}: {err}") from err
    try:
        writer.write(json.dumps({"address": address, "op": op, "payload": dict(payload)}).encode() + b"\n")
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
        except TimeoutError as err:
            raise OutcomeUnknown(f"{op}: the controller on {path} did not answer within {timeout:g} s") from err
        if not line:
            raise OutcomeUnknown(f"{op}: the controller on {path} closed the connection without an answer")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise OutcomeUnknown(f"{op}: the controller on {path} sent a malformed answer")
        return answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def controller_serves(path: Path, address: str, timeout: float) -> bool:
    """Whether a controller listens at ``path`` and serves the guest at QMP ``address``."""
    try:
        answer = await _call(path, address, _SERVES, {}, timeout)
    except QmpnetError:
        return False
    return answer.get("status") == "ok"


class ControlGuest:
    """A guest held by the local controller, with the methods of :class:`qmpnet.Guest` (a ``GuestOps``)."""

    def __init__(self, path: Path, address: str, *, timeout: float, verify_timeout: float = 0.0) -> None:
        self.path = path
        self.address = address
        self.timeout = timeout
        self.verify_timeout = verify_timeout

    async def _data(self, op: str, payload: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        return data_of(await _call(self.path, self.address, op, payload, timeout or self.timeout))

    async def add_nic(self, spec: NicSpec | Mapping[str, Any], *, verify: Verify = False) -> Nic:
        """Hot-add a NIC (see :meth:`qmpnet.Guest.add_nic`)."""
        nic = parse_nic_spec(spec).model_dump(mode="json", exclude_none=True)
        return Nic.model_validate(await self._data("nic/add", {"nic": nic, "verify": verify}, self._verifying(verify)))

    async def remove_nic(self, nic_id: str, timeout: float | None = None, *, verify: Verify = False) -> RemoveResult:
        """Hot-remove a NIC (see :meth:`qmpnet.Guest.remove_nic`)."""
        payload: dict[str, Any] = {"id": nic_id, "verify": verify}
        if timeout is not None:
            payload["timeout"] = timeout
        wait = self._verifying(verify) + (timeout or 0)
        return RemoveResult.model_validate(await self._data("nic/del", payload, wait))

    async def set_link(self, nic_id: str, up: bool, *, verify: Verify = False) -> Nic:
        """Set a NIC's link (see :meth:`qmpnet.Guest.set_link`)."""
        payload = {"id": nic_id, "up": up, "verify": verify}
        return Nic.model_validate(await self._data("nic/link", payload, self._verifying(verify)))

    def _verifying(self, verify: Verify) -> float:
        return self.timeout + (self.verify_timeout if verify else 0.0)

    async def update_nic(self, update: NicUpdate | Mapping[str, Any]) -> Nic:
        """Change a NIC live (see :meth:`qmpnet.Guest.update_nic`)."""
        body = parse_nic_update(update).model_dump(mode="json", exclude_unset=True)
        return Nic.model_validate(await self._data("nic/update", {"update": body}))

    async def capture(self, nic_id: str, action: Literal["start", "stop"], file: str | None = None) -> CaptureResult:
        """Start or stop a NIC's live capture (see :meth:`qmpnet.Guest.capture`)."""
        payload: dict[str, Any] = {"id": nic_id, "action": action} | ({"file": file} if file is not None else {})
        return CaptureResult.model_validate(await self._data("nic/capture", payload))

    async def list_nics(self) -> list[Nic]:
        """List the NICs (see :meth:`qmpnet.Guest.list_nics`)."""
        return NicList.model_validate(await self._data("nic/list", {})).nics

    async def models(self) -> list[ModelInfo]:
        """List the NIC models (see :meth:`qmpnet.Guest.models`)."""
        return ModelList.model_validate(await self._data("models", {})).models

    async def slots(self) -> Capacity:
        """How many more NICs fit, and where (see :meth:`qmpnet.Guest.slots`)."""
        return Capacity.model_validate(await self._data("slots", {}))


def not_served(address: str) -> NotFound:
    """The answer of a controller that does not serve the guest at ``address``."""
    return NotFound(f"address: this controller does not serve the guest at {address}", field="address")
