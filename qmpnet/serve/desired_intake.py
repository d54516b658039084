"""One guest's intake of desired documents: the one place a document waits, is checked, stored and converged to.

A desired document (the retained MQTT topic) can arrive before its guest is discovered, or before the guest's
record is open. The controller keeps one :class:`DesiredIntake` per guest name from the first document or the
guest's discovery, whichever comes first; the intake keeps the newest document until the guest's supervisor opens
the record (:meth:`DesiredIntake.attach`), then stores it and asks for a reconcile pass.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qmpnet.api.wire.envelopes import DesiredError, DesiredStatus
from qmpnet.core.desired_diff import parse_desired
from qmpnet.errors import InvalidRequest

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from qmpnet.core.ports import GuestStore

__all__ = ["DesiredIntake"]

log = logging.getLogger(__name__)

class DesiredIntake:
    """Desired documents for guest ``name``: kept until its record is open, then stored and converged to.

    Args:
        name: The guest's name.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        #: The ``desired`` part of the guest's status (``None``: no desired set, or none checked yet).
        self.status: DesiredStatus | None = None
        self._waiting: tuple[Mapping[str, Any] | InvalidRequest | None] | None = None
        self._store: GuestStore | None = None
        self._publish: Callable[[], None] = _nothing
        self._converge: Callable[[bool], None] = _nothing_explicit

    def attach(self, store: GuestStore, *, publish: Callable[[], None], converge: Callable[[bool], None]) -> None:
        """The guest's record is open: take the document waiting, if any.

        Args:
            store: The guest's record.
            publish: Publishes the guest's status (after :attr:`status` changed).
            converge: Asks for a reconcile pass (``True``: the desired set is new).
        """
        self._store, self._publish, self._converge = store, publish, converge
        if self._waiting is not None:
            (payload,) = self._waiting
            self._waiting = None
            self.take(payload)

    def detach(self) -> None:
        """The guest's record is closed: documents wait again."""
        self._store, self._publish, self._converge = None, _nothing, _nothing_explicit

    def take(self, payload: Mapping[str, Any] | InvalidRequest | None) -> None:
        """Take a desired document (``None``: clear the set; an error: unreadable), store it and converge to it."""
        if self._store is None:
            self._waiting = (payload,)  # taken once the record is open
            return
        record = self._store.record
        if payload is None:
            self._store.save(record.model_copy(update={"desired": None}))
            self._store.flush_soon()  # the durable desired file
            self.status_changed(None)
            return
        try:
            if isinstance(payload, InvalidRequest):
                raise payload
            desired = parse_desired(payload, source="mqtt")
        except InvalidRequest as err:
            log.warning("guest %s: desired document refused: %s", self.name, err, extra={"guest": self.name})
            generation = record.desired.generation if record.desired is not None else 0
            refused = DesiredError(id=None, code=err.code, message=err.message, field=err.field)
            self.status_changed(DesiredStatus(generation=generation, converged=False, errors=[refused]))
            return
        current = record.desired
        if current is not None and current.source == "mqtt" and desired.generation < current.generation:
            log.info("guest %s: desired generation %d is older than %d: ignored", self.name, desired.generation,
                     current.generation, extra={"guest": self.name})
            return
        news = current is None or current.generation != desired.generation or current.source != "mqtt"
        if news:
            self._store.save(record.model_copy(update={"desired": desired}))
            self._store.flush_soon()  # the durable desired file
        self._converge(news)

    def status_changed(self, status: DesiredStatus | None) -> None:
        """A reconcile pass (or a refused document) changed the ``desired`` status: publish it if it differs."""
        if status != self.status:
            self.status = status
            self._publish()


def _nothing() -> None:
    pass


def _nothing_explicit(explicit: bool) -> None:
    pass
