"""The Python client for orchestrators: drive ``qmpnet serve`` controllers over MQTT.

::

    async with qmpnet.client.Client(["mqtt://node1:1883", "mqtt://node2:1883"]) as client:
        nic = await client.add_nic("h1", "vm1", {"model": "virtio", "backend": {"type": "user"}})
        await client.set_link("h1", "vm1", nic.id, up=False)
        print(await client.guests("h1"))

Every call is one request (MQTT 5 with a Response Topic, or 3.1.1: ``mqtt.protocol`` is ``auto`` by default),
waits for its answer at most the timeout, and returns the same objects as the direct API
(:class:`~qmpnet.core.model.Nic`, ...). An error answer is raised as the :class:`~qmpnet.errors.QmpnetError` subclass of
its code, so code written against ``qmpnet.connect`` handles errors the same way. No answer in time is
``OutcomeUnknown``; every request carries a ``transaction`` (random unless given), so repeating it with the same
transaction is safe. The broker connection is re-established when it breaks, with the next broker of the list when
there are several (see :mod:`qmpnet.adapters.mqtt.requester`).

:meth:`Client.guest` gives an object with the methods of :class:`qmpnet.Guest` bound to one remote guest.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Final, Literal, Self, cast

from qmpnet.adapters.mqtt.requester import Requester
from qmpnet.api.wire.envelopes import GuestInfo, GuestList, ModelList, NicList, data_of, error_from
from qmpnet.api.wire.topics import Topics, is_bus_name
from qmpnet.core.desired_diff import parse_desired
from qmpnet.core.model_base import Verify
from qmpnet.core.names import BUS_NAME_RULE
from qmpnet.core.nic_requests import NicSpec, NicUpdate, parse_nic_spec, parse_nic_update
from qmpnet.core.observed import Capacity, CaptureResult, ModelInfo, Nic, RemoveResult
from qmpnet.core.ports import GuestOps
from qmpnet.errors import InvalidRequest
from qmpnet.settings import MqttSettings, QgaSettings

if TYPE_CHECKING:
    from collections.abc import Hashable, Mapping, Sequence
    from types import TracebackType

    from qmpnet.core.model_base import Verify

__all__ = ["Client", "GuestOps", "RemoteGuest", "error_from"]

#: At most this many specs' JSON kept by a client (all forgotten when one more comes).
_SPECS_KEPT: Final = 256
#: The types of a plain spec's scalars, by value in its frozen form, and how deep its lists and dictionaries go.
_SCALARS: Final = frozenset({str, int, bool, type(None)})
_DEPTH: Final = 6


def _new_transaction() -> str:
    """``uuid.uuid4().hex``: 16 random bytes with a UUID's version 4 and RFC 4122 variant, in hex.

    The same bits as ``uuid4`` sets, without its ``UUID`` object: ~5 k instructions, not ~16 k.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # variant: RFC 4122
    return raw.hex()


def _frozen(value: object, depth: int = 0) -> Hashable | None:
    """``value`` as a key if it is a dictionary or a list of scalars, lists and dictionaries: each with its type.

    ``None`` for anything else, or deeper than a spec goes (left to pydantic, which says what is wrong).
    """
    kind = type(value)
    if kind is dict:
        pairs = cast("dict[object, object]", value).items()
    elif kind is list:
        pairs = enumerate(cast("list[object]", value))  # type: ignore[assignment]
    else:
        return None
    parts: list[object] = [kind]
    for name, item in pairs:
        if type(name) is not str and kind is dict:
            return None
        if type(item) in _SCALARS:
            parts += (name, type(item), item)
            continue
        frozen = _frozen(item, depth + 1) if depth < _DEPTH else None
        if frozen is None:
            return None
        parts += (name, frozen)
    return tuple(parts)


class Client:
    """A connection to the broker through which any controller and guest can be driven.

    Args:
        broker: ``mqtt://host:port`` or ``mqtts://host:port``, or a sequence of them (the nodes of one cluster,
            tried in order, the next one when a connection is lost); overrides ``settings.broker``/``brokers``.
        settings: Broker credentials, TLS files, MQTT version, topic root and the default timeout
            (``request_timeout``).
        timeout: Seconds to wait for each answer (default: ``settings.request_timeout``).
        verify_timeout: Seconds a verified change may take on top (default: the ``qga.verify_timeout`` default).
        client_id: The MQTT client id (random when absent).
    """

    def __init__(
        self,
        broker: str | Sequence[str] | None = None,
        *,
        settings: MqttSettings | None = None,
        timeout: float | None = None,
        verify_timeout: float | None = None,
        client_id: str | None = None,
    ) -> None:
        settings = settings or MqttSettings()
        if broker is not None:
            urls = [broker] if isinstance(broker, str) else list(broker)
            fields = settings.model_dump(exclude={"broker", "brokers"})
            settings = MqttSettings.model_validate({**fields, "brokers": urls})
        self.settings = settings
        self.timeout = timeout if timeout is not None else settings.request_timeout
        self.verify_timeout = verify_timeout if verify_timeout is not None else QgaSettings().verify_timeout
        self._requester = Requester(settings, client_id=client_id)
        self._specs: dict[Hashable, dict[str, Any]] = {}  # a plain spec's value -> its JSON (see _nic_json)

    async def __aenter__(self) -> Self:
        """Connect to the broker.

        Raises:
            BrokerUnavailable: The broker cannot be reached or refused us (a ``GuestUnavailable``); says why.
        """
        await self._requester.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._requester.__aexit__(exc_type, exc, tb)

    async def call(  # noqa: PLR0913 - the request's coordinates, then keyword-only knobs
        self,
        controller: str,
        guest: str | None,
        op: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        transaction: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one request and return its ``data``.

        Raises:
            QmpnetError: The subclass of the error code the controller answered with.
            OutcomeUnknown: No answer in time.
            GuestUnavailable: The controller is offline, or the broker could not be reached; nothing was sent.
        """
        payload = {"transaction": transaction or _new_transaction(), **(arguments or {})}
        answer = await self._requester.request(controller, guest, op, payload, timeout=timeout or self.timeout)
        return data_of(answer)

    async def add_nic(
        self,
        controller: str,
        guest: str,
        spec: NicSpec | Mapping[str, Any],
        *,
        transaction: str | None = None,
        verify: Verify = False,
    ) -> Nic:
        """Hot-add a NIC to ``guest`` (the spec is checked here first, then by the controller)."""
        arguments = {"nic": self._nic_json(spec), "verify": verify}
        data = await self.call(controller, guest, "nic/add", arguments, transaction=transaction,
                               timeout=self._verifying(verify))
        return Nic.model_validate(data)

    async def remove_nic(  # noqa: PLR0913 - the request's coordinates, then keyword-only knobs
        self,
        controller: str,
        guest: str,
        nic_id: str,
        timeout: float | None = None,
        *,
        transaction: str | None = None,
        verify: Verify = False,
    ) -> RemoveResult:
        """Hot-remove NIC ``nic_id``: ``removed``, or ``removal_pending`` without the guest's ack in ``timeout``."""
        arguments: dict[str, Any] = {"id": nic_id, "verify": verify} | ({"timeout": timeout} if timeout else {})
        margin = self.settings.remove_margin
        wait = max(self.timeout, (timeout or 0) + margin) + (self.verify_timeout if verify else 0.0)
        data = await self.call(controller, guest, "nic/del", arguments, transaction=transaction, timeout=wait)
        return RemoveResult.model_validate(data)

    async def set_link(  # noqa: PLR0913 - the request's coordinates, then keyword-only knobs
        self, controller: str, guest: str, nic_id: str, up: bool, *, transaction: str | None = None,
        verify: Verify = False,
    ) -> Nic:
        """Set NIC ``nic_id``'s link up or down."""
        arguments = {"id": nic_id, "up": up, "verify": verify}
        data = await self.call(controller, guest, "nic/link", arguments, transaction=transaction,
                               timeout=self._verifying(verify))
        return Nic.model_validate(data)

    def _nic_json(self, spec: NicSpec | Mapping[str, Any]) -> dict[str, Any]:
        """The spec checked (raises ``InvalidRequest``), as sent: once for each value of a plain spec.

        Checking and dumping a spec is ~60 k instructions of the client's ~0.65 M per MQTT hot-add, and an
        orchestrator adds NICs from a few templates: a spec seen before costs ~6 k, a new one ~1.5 k more per
        value in it (its key). The models of the core are pure (no I/O, no clock, no settings), so a value
        checked once checks the same way again; its JSON is kept by the value, frozen with the type of every part
        (``True`` is not ``1``; no float: ``-0.0`` equals ``0.0`` but is sent otherwise). Nobody changes the
        dictionary sent: the requester copies what it adds a transaction to, then encodes it.
        """
        key = _frozen(spec)
        nic = self._specs.get(key) if key is not None else None
        if nic is None:
            nic = parse_nic_spec(spec).model_dump(mode="json", exclude_none=True)
            if key is not None:
                if len(self._specs) >= _SPECS_KEPT:
                    self._specs.clear()
                self._specs[key] = nic
        return nic

    def _verifying(self, verify: Verify) -> float:
        """How long to wait for an answer: a verified change may take the guest's verify timeout on top."""
        return self.timeout + (self.verify_timeout if verify else 0.0)

    async def update_nic(
        self, controller: str, guest: str, update: NicUpdate | Mapping[str, Any], *, transaction: str | None = None
    ) -> Nic:
        """Change a NIC live (the update is checked here first, then by the controller)."""
        body = parse_nic_update(update).model_dump(mode="json", exclude_unset=True)
        data = await self.call(controller, guest, "nic/update", {"update": body}, transaction=transaction)
        return Nic.model_validate(data)

    async def capture(  # noqa: PLR0913 - the request's coordinates, then its arguments
        self,
        controller: str,
        guest: str,
        nic_id: str,
        action: Literal["start", "stop"],
        file: str | None = None,
        *,
        transaction: str | None = None,
    ) -> CaptureResult:
        """Start or stop NIC ``nic_id``'s live capture into ``file`` (a path on the controller's host)."""
        arguments: dict[str, Any] = {"id": nic_id, "action": action} | ({"file": file} if file is not None else {})
        data = await self.call(controller, guest, "nic/capture", arguments, transaction=transaction)
        return CaptureResult.model_validate(data)

    async def list_nics(self, controller: str, guest: str) -> list[Nic]:
        """The guest's NICs, read afresh by the controller."""
        return NicList.model_validate(await self.call(controller, guest, "nic/list")).nics

    async def models(self, controller: str, guest: str) -> list[ModelInfo]:
        """The NIC models the guest's QEMU offers."""
        return ModelList.model_validate(await self.call(controller, guest, "models")).models

    async def slots(self, controller: str, guest: str) -> Capacity:
        """How many more NICs of each model the guest can take now, and where, read afresh by the controller."""
        return Capacity.model_validate(await self.call(controller, guest, "slots"))

    async def guests(self, controller: str) -> list[GuestInfo]:
        """The guests ``controller`` serves, with their connection state."""
        return GuestList.model_validate(await self.call(controller, None, "guests")).guests

    async def set_desired(
        self, controller: str, guest: str, document: Mapping[str, Any] | None, *, timeout: float | None = None
    ) -> None:
        """Publish ``guest``'s desired NIC set, retained (``None``: clear it); see docs/mqtt-api.md, "Desired state".

        ``document`` is ``{"generation": N, "nics": [NIC spec with "id", ...], "prune": false}``, checked here
        first, then by the controller, which converges the guest to it and reports how far it got in the guest's
        status (``desired`` in :meth:`guests`). Returns when the broker has it (PUBACK).

        Raises:
            InvalidRequest: A name or the document is invalid; names the field.
            GuestUnavailable: No broker took it within the timeout.
        """
        for field, name in (("controller", controller), ("guest", guest)):
            if not is_bus_name(name):
                raise InvalidRequest(f"{field}: {name!r} is not {BUS_NAME_RULE}", field=field)
        body = b""
        if document is not None:
            parse_desired(document, source="mqtt")
            body = json.dumps(dict(document)).encode()
        topic = Topics(self.settings.topic_root, controller).desired(guest)
        await self._requester.publish_retained(topic, body, timeout=timeout or self.timeout)

    def guest(self, controller: str, name: str) -> RemoteGuest:
        """The guest ``name`` of ``controller``, with the methods of :class:`qmpnet.Guest`."""
        return RemoteGuest(self, controller, name)


class RemoteGuest:
    """One guest behind a controller, with the same methods as :class:`qmpnet.Guest` (a :class:`GuestOps`)."""

    def __init__(self, client: Client, controller: str, name: str) -> None:
        self.client = client
        self.controller = controller
        self.name = name

    async def add_nic(self, spec: NicSpec | Mapping[str, Any], *, verify: Verify = False) -> Nic:
        """Hot-add a NIC (see :meth:`Client.add_nic`)."""
        return await self.client.add_nic(self.controller, self.name, spec, verify=verify)

    async def remove_nic(self, nic_id: str, timeout: float | None = None, *, verify: Verify = False) -> RemoveResult:
        """Hot-remove a NIC (see :meth:`Client.remove_nic`)."""
        return await self.client.remove_nic(self.controller, self.name, nic_id, timeout, verify=verify)

    async def set_link(self, nic_id: str, up: bool, *, verify: Verify = False) -> Nic:
        """Set a NIC's link (see :meth:`Client.set_link`)."""
        return await self.client.set_link(self.controller, self.name, nic_id, up, verify=verify)

    async def list_nics(self) -> list[Nic]:
        """List the NICs (see :meth:`Client.list_nics`)."""
        return await self.client.list_nics(self.controller, self.name)

    async def models(self) -> list[ModelInfo]:
        """List the NIC models (see :meth:`Client.models`)."""
        return await self.client.models(self.controller, self.name)

    async def slots(self) -> Capacity:
        """How many more NICs fit, and where (see :meth:`Client.slots`)."""
        return await self.client.slots(self.controller, self.name)

    async def update_nic(self, update: NicUpdate | Mapping[str, Any]) -> Nic:
        """Change a NIC live (see :meth:`Client.update_nic`)."""
        return await self.client.update_nic(self.controller, self.name, update)

    async def capture(self, nic_id: str, action: Literal["start", "stop"], file: str | None = None) -> CaptureResult:
        """Start or stop a NIC's live capture (see :meth:`Client.capture`)."""
        return await self.client.capture(self.controller, self.name, nic_id, action, file)
