"""The one error tree of qmpnet.

Every error a caller can see derives from :class:`QmpnetError` and carries a stable machine ``code``: the same
closed list of codes the MQTT API returns (``docs/errors.md``). Errors are split by *what went wrong*, not by
which layer noticed it, so a caller can act on the class alone::

    QmpnetError (internal)
     +-- InvalidRequest (invalid_request)      bad input; names the offending field; nothing was sent
     +-- NotFound (not_found)                  no such NIC / guest / bridge / network
     +-- Conflict (conflict)                   id or MAC already in the guest
     +-- Busy (busy)                           the guest lane is full
     +-- Timeout (timeout)                     a wait we control ran out (no command left in flight)
     +-- RemovalPending (removal_pending)      the NIC is being unplugged and the guest has not acked
     +-- GuestUnavailable (guest_unavailable)  the QMP monitor cannot be reached; nothing was sent
     |    +-- BrokerUnavailable                the MQTT broker cannot be reached or refused us; says why
     |    +-- AgentUnavailable                 the guest agent cannot be reached or did not answer in time
     +-- NoFreeSlot (no_free_slot)             PCI placement found no place; says what to add to the command line
     +-- Unsupported (unsupported)             this QEMU or machine cannot do what was asked
     +-- Forbidden (forbidden)                 the operator's policy refuses the request
     +-- QmpCommandError (qmp_error)           QEMU answered a command with an error (carries ``qmp_class``)
     |    +-- AgentCommandError                the guest agent answered a command with an error
     |    +-- UnexpectedReply (qmp_error)      QEMU answered in a shape qmpnet does not know (``UnexpectedReply``)
     +-- OutcomeUnknown (outcome_unknown)      a command was sent and no answer came (timeout or disconnect)
     +-- NotVerified (not_verified)            the guest did not show what was asked (interface, address,
     |                                         carrier, absence) within the verify timeout
     +-- StoreUnavailable (store_unavailable)  the state store cannot be written (full disk, read-only, gone):
                                               qmpnet cannot record the change, so it does not make it

Adapters translate library errors into this tree with ``raise ... from err`` so the cause is kept.
``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

from typing import ClassVar, Final, Literal

ErrorCode = Literal[
    "invalid_request",
    "not_found",
    "conflict",
    "busy",
    "timeout",
    "removal_pending",
    "guest_unavailable",
    "no_free_slot",
    "unsupported",
    "forbidden",
    "qmp_error",
    "outcome_unknown",
    "not_verified",
    "store_unavailable",
    "internal",
]

__all__ = [
    "FATAL_BROKER_PROBLEMS",
    "AgentCommandError",
    "AgentUnavailable",
    "BrokerProblem",
    "BrokerUnavailable",
    "Busy",
    "Conflict",
    "ErrorCode",
    "Forbidden",
    "GuestUnavailable",
    "InvalidRequest",
    "NoFreeSlot",
    "NotFound",
    "NotVerified",
    "OutcomeUnknown",
    "QmpCommandError",
    "QmpnetError",
    "RemovalPending",
    "StoreUnavailable",
    "Timeout",
    "UnexpectedReply",
    "Unsupported",
]


class QmpnetError(Exception):
    """Root of every qmpnet error.

    Args:
        message: A human sentence saying what went wrong.
        field: JSON path of the offending input field, when the error is about one.
    """

    code: ClassVar[ErrorCode] = "internal"

    def __init_subclass__(cls, *, code: ErrorCode | None = None, **kwargs: object) -> None:
        """Take the code a subclass names in its header, e.g. ``class NotFound(QmpnetError, code="not_found")``.

        A subclass that names none keeps its parent's.
        """
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidRequest(QmpnetError, code="invalid_request"):
    """The request is malformed or a field is invalid; nothing was sent to QEMU."""


class NotFound(QmpnetError, code="not_found"):
    """The named NIC, guest, bridge or network does not exist."""


class Conflict(QmpnetError, code="conflict"):
    """The id or MAC asked for is already used in the guest."""


class Busy(QmpnetError, code="busy"):
    """The guest has too many requests waiting."""


class Timeout(QmpnetError, code="timeout"):
    """A wait ran out before the awaited thing happened; no command is left in flight."""


class RemovalPending(QmpnetError, code="removal_pending"):
    """The NIC is being unplugged; the guest has not acknowledged yet."""


class GuestUnavailable(QmpnetError, code="guest_unavailable"):
    """The guest's QMP monitor cannot be reached; no command was sent."""


#: Why a broker connection failed: the port refused, the host unreachable, TLS, credentials (or authorisation),
#: the MQTT version not spoken, no answer in time, or an established connection lost.
BrokerProblem = Literal["refused", "unreachable", "tls", "credentials", "protocol", "timeout", "lost"]
#: Problems that retrying does not cure: the configuration must change.
FATAL_BROKER_PROBLEMS: Final = frozenset({"credentials", "protocol"})


class BrokerUnavailable(GuestUnavailable):
    """The MQTT broker cannot be reached or refused the connection; nothing was sent.

    Args:
        message: What failed and why, with the broker's own reason when it gave one (never a password).
        problem: The kind of failure.
    """

    def __init__(self, message: str, *, problem: BrokerProblem) -> None:
        super().__init__(message)
        self.problem: BrokerProblem = problem

    @property
    def fatal(self) -> bool:
        """Whether retrying cannot help (bad credentials, an MQTT version the broker does not speak)."""
        return self.problem in FATAL_BROKER_PROBLEMS


class NoFreeSlot(QmpnetError, code="no_free_slot"):
    """No PCI place is free for the NIC; the message says what to add to the QEMU command line."""


class Unsupported(QmpnetError, code="unsupported"):
    """This QEMU, machine or model cannot do what was asked."""


class Forbidden(QmpnetError, code="forbidden"):
    """The operator's policy refuses the request."""


class QmpCommandError(QmpnetError, code="qmp_error"):
    """QEMU answered a command with an error.

    Args:
        message: QEMU's description, prefixed with the command.
        qmp_class: QEMU's error class, e.g. ``GenericError`` or ``DeviceNotFound``.
        command: The QMP command that failed.
    """

    def __init__(self, message: str, *, qmp_class: str, command: str) -> None:
        super().__init__(message)
        self.qmp_class = qmp_class
        self.command = command


class OutcomeUnknown(QmpnetError, code="outcome_unknown"):
    """A command was sent but no answer came: QEMU may or may not have applied it."""


class AgentUnavailable(GuestUnavailable):
    """The guest agent (qemu-guest-agent) cannot be reached, or it did not answer in time.

    Its code stays ``guest_unavailable``: to a caller it is the same situation as an unreachable monitor, only
    about the guest's agent socket.
    """


class AgentCommandError(QmpCommandError):
    """The guest agent answered a command with an error (``qmp_class`` is the agent's error class)."""


class NotVerified(QmpnetError, code="not_verified"):
    """The guest did not show what was asked of it in time: an interface, an address, a carrier, or its absence.

    Args:
        message: What was awaited and what the guest showed instead.
        field: The request field that asked for the verification (``verify``), when there is one.
    """


class UnexpectedReply(QmpCommandError):
    """QEMU answered, but in a shape qmpnet does not know: reading the guest stops there instead of guessing.

    Its ``qmp_class`` is ``UnexpectedReply`` (QEMU reported no error; qmpnet refused the answer). The message names
    the command and quotes the part of the answer that did not fit. Nothing was changed.

    Args:
        message: What did not fit, prefixed with the command.
        command: The QMP command (or ``human-monitor-command <line>``) whose answer it was.
    """

    def __init__(self, message: str, *, command: str) -> None:
        super().__init__(message, qmp_class="UnexpectedReply", command=command)


class StoreUnavailable(QmpnetError, code="store_unavailable"):
    """The state store cannot be written (a full disk, a read-only or vanished directory); the message says why.

    The request itself was valid: qmpnet refuses a change it could not record, since a change whose record is
    missing could neither be finished nor undone after a restart. Whatever the request had begun is undone.
    """
