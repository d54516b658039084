"""The topic scheme of the MQTT API (docs/mqtt-api.md), as a value object instead of f-strings everywhere.

Every topic the controller publishes or listens on is built here, and every incoming request topic is parsed
here, so the scheme is written down once. Pure: no I/O, no MQTT library.

    <root>/<c>/status                         retained controller availability
    <root>/<c>/guest/<g>/status               retained guest connection state
    <root>/<c>/guest/<g>/nics                 retained NIC list
    <root>/<c>/guest/<g>/event/<name>         events
    <root>/<c>/guest/<g>/desired              retained desired NIC set (published by the orchestrator)
    <root>/<c>/guest/<g>/request/<op>         requests for one guest (op may hold a slash: nic/add)
    <root>/<c>/request/<op>                   controller-level requests
    .../response/<op>                         answers to MQTT 3.1.1 clients (request -> response)
    <root>/<c>/client/<client-id>/response    where qmpnet.client asks for its MQTT 5 answers
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from qmpnet.core.names import BUS_NAME_PATTERN

__all__ = ["RequestTopic", "Topics", "is_bus_name"]

_NAME: Final = re.compile(BUS_NAME_PATTERN)
_WILDCARDS: Final = frozenset("+#")


def is_bus_name(value: str) -> bool:
    """Whether ``value`` can be a controller id, guest name or client id (:data:`qmpnet.core.names.BUS_NAME_RULE`)."""
    return _NAME.fullmatch(value) is not None


@dataclass(frozen=True)
class RequestTopic:
    """A parsed request topic: the guest (``None`` for controller-level requests) and the op."""

    guest: str | None
    op: str


@dataclass(frozen=True)
class Topics:
    """The topics of one controller under one root.

    Args:
        root: The first topic level(s), ``qmpnet`` by default.
        controller: The controller id.
    """

    root: str
    controller: str

    @property
    def base(self) -> str:
        """``<root>/<controller>``."""
        return f"{self.root}/{self.controller}"

    @property
    def status(self) -> str:
        """The controller's retained availability."""
        return f"{self.base}/status"

    def guest_status(self, guest: str) -> str:
        """A guest's retained connection state."""
        return f"{self.base}/guest/{guest}/status"

    def guest_nics(self, guest: str) -> str:
        """A guest's retained NIC list."""
        return f"{self.base}/guest/{guest}/nics"

    def event(self, guest: str, name: str) -> str:
        """An event about a guest."""
        return f"{self.base}/guest/{guest}/event/{name}"

    def request(self, guest: str | None, op: str) -> str:
        """Where a request for ``op`` on ``guest`` (or the controller) goes."""
        return f"{self.base}/guest/{guest}/request/{op}" if guest is not None else f"{self.base}/request/{op}"

    def response(self, guest: str | None, op: str) -> str:
        """Where the answer to a request without an MQTT 5 Response Topic goes."""
        return f"{self.base}/guest/{guest}/response/{op}" if guest is not None else f"{self.base}/response/{op}"

    @property
    def request_filters(self) -> tuple[str, str]:
        """The subscriptions that catch every request to this controller."""
        return f"{self.base}/guest/+/request/#", f"{self.base}/request/#"

    def response_filter(self, guest: str | None) -> str:
        """The subscription that catches every default-topic answer about ``guest`` (or controller-level ops)."""
        return f"{self.base}/guest/{guest}/response/#" if guest is not None else f"{self.base}/response/#"

    def desired(self, guest: str) -> str:
        """A guest's desired NIC set (retained, published by the orchestrator)."""
        return f"{self.base}/guest/{guest}/desired"

    @property
    def desired_filter(self) -> str:
        """The subscription that catches every guest's desired set."""
        return f"{self.base}/guest/+/desired"

    def parse_desired(self, topic: str) -> str | None:
        """The guest a desired-set topic is about; ``None`` if ``topic`` is not one of this controller's."""
        prefix = f"{self.base}/guest/"
        if not topic.startswith(prefix) or not topic.endswith("/desired"):
            return None
        guest = topic[len(prefix) : -len("/desired")]
        return guest if is_bus_name(guest) else None

    def client_response(self, client_id: str) -> str:
        """The MQTT 5 Response Topic a :mod:`qmpnet.client` with ``client_id`` asks this controller to use."""
        return f"{self.base}/client/{client_id}/response"

    def parse_request(self, topic: str) -> RequestTopic | None:
        """Split a request topic into guest and op; ``None`` if ``topic`` is not a request to this controller."""
        prefix = f"{self.base}/"
        if not topic.startswith(prefix):
            return None
        levels = topic[len(prefix) :].split("/")
        if len(levels) >= 2 and levels[0] == "request":
            return RequestTopic(None, "/".join(levels[1:]))
        if len(levels) >= 4 and levels[0] == "guest" and levels[2] == "request":
            return RequestTopic(levels[1], "/".join(levels[3:]))
        return None

    def may_answer_on(self, topic: str) -> bool:
        """Whether a caller-chosen Response Topic is acceptable.

        Refused: wildcards, empty levels at the ends, and this controller's own state, event and request topics
        (an answer there would spoof state or loop back as a request).
        """
        if not topic or _WILDCARDS & set(topic) or "\x00" in topic:
            return False
        prefix = f"{self.base}/"
        if not topic.startswith(prefix):
            return True
        levels = topic[len(prefix) :].split("/")
        if levels[0] in ("client", "response"):
            return True
        return len(levels) > 3 and levels[0] == "guest" and levels[2] == "response"
