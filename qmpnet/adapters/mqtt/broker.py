"""Reaching the broker: the ``aiomqtt.Client`` for our settings, the MQTT version to speak, and why a connect failed.

Design decisions:

- **``auto`` asks the broker once.** A broker that speaks only MQTT 3.1.1 answers an MQTT 5 CONNECT in one of two
  ways: an old-style CONNACK "unacceptable protocol version" (which paho reports as such), or by closing the
  connection without a word (RabbitMQ 3.x). ``aiomqtt`` turns the second into a 10 s "Operation timed out",
  indistinguishable from a dead broker. So before the first connection :func:`resolve_protocol` sends one bare
  MQTT 5 CONNECT on a plain socket (no credentials, a throw-away client id) and reads the first bytes of the
  answer: a v5 CONNACK means 5, an old CONNACK or a closed connection means 3.1.1. The result is kept by the
  caller for the life of the process and logged once.
- **Every failure says why.** :func:`explain` turns an ``aiomqtt`` error into a
  :class:`~qmpnet.errors.BrokerUnavailable` naming the kind of problem (port refused, host unreachable, TLS,
  credentials with the broker's own reason, MQTT version, timeout, lost connection) and the broker URL without
  its password. A forced MQTT 5 that times out is probed too, so the message can say "does not speak MQTT 5".
- **One broker at a time.** Everything here acts on the first of ``settings.urls``; a caller with several brokers
  passes ``settings.at(url)`` for the one it tries (the failover order is the caller's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
from typing import TYPE_CHECKING, Final, Literal

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from qmpnet.adapters.mqtt.aiomqtt_internals import fewer_system_calls
from qmpnet.errors import BrokerProblem, BrokerUnavailable
from qmpnet.settings import parse_broker_url, redact_url

if TYPE_CHECKING:
    from qmpnet.settings import MqttSettings

__all__ = ["Version", "diagnose_timeout", "explain", "make_client", "resolve_protocol", "speaks_mqtt5", "tls_context"]

log = logging.getLogger(__name__)

#: A concrete MQTT version, once ``auto`` is resolved.
Version = Literal["5", "3.1.1"]
NODELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_CONNACK: Final = 0x20
_UNSUPPORTED_VERSION: Final = 0x84  # MQTT 5 reason code 132
#: MQTT 5 CONNACK reason codes (and the 3.1.1 return codes paho maps onto them) that mean "who are you?".
_CREDENTIALS: Final = frozenset({134, 135, 140})  # bad user name or password, not authorized, bad auth method
_PROTOCOL: Final = frozenset({1, 132})
_PAHO_LOGGER: Final = logging.getLogger("qmpnet.adapters.mqtt.paho")


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """The TLS context for ``mqtts://``: the system CAs or ``ca_file``, and the client certificate if given."""
    context = ssl.create_default_context(cafile=settings.ca_file)
    if settings.cert_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def make_client(  # noqa: PLR0913 - the connection's identity and its session, all keyword-only
    settings: MqttSettings,
    *,
    identifier: str,
    protocol: Version,
    will: aiomqtt.Will | None = None,
    session_expiry: int = 0,
    max_inflight: int | None = None,
    queue_type: type[asyncio.Queue[aiomqtt.Message]] | None = None,
) -> aiomqtt.Client:
    """An ``aiomqtt.Client`` for ``settings`` (first broker URL, credentials, TLS), with TCP_NODELAY on its socket.

    ``session_expiry > 0`` makes the session persistent: clean start off, and with MQTT 5 the broker keeps it that
    many seconds after a disconnect (3.1.1 has no expiry: the broker's own policy applies).
    """
    url = parse_broker_url(settings.urls[0])
    password = settings.password.get_secret_value() if settings.password is not None else url.password
    v5 = protocol == "5"
    persistent = session_expiry > 0
    properties = None
    if v5 and persistent:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry
    client = aiomqtt.Client(
        url.host,
        url.port,
        username=settings.username or url.username,
        password=password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else not persistent,
        clean_start=(not persistent) if v5 else MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
        will=will,
        keepalive=settings.keepalive,
        timeout=settings.connect_timeout,
        max_inflight_messages=max_inflight,
        queue_type=queue_type,
        tls_context=tls_context(settings) if url.tls else None,
        socket_options=(NODELAY,),
        logger=_PAHO_LOGGER,
    )
    # We bound what is in flight ourselves; aiomqtt's warning about "pending publish calls" would be noise.
    client.pending_calls_threshold = max(max_inflight or 0, 10) * 4
    fewer_system_calls(client)
    return client


async def resolve_protocol(settings: MqttSettings) -> Version:
    """The MQTT version to speak: ``settings.protocol``, or for ``auto`` the one the broker answers to.

    Waits for one bare MQTT 5 CONNECT and its answer (at most ``connect_timeout``); with a forced version and TLS,
    for one TLS handshake.

    Raises:
        BrokerUnavailable: The broker cannot be reached (refused, unreachable, TLS, no answer in time).
    """
    where = redact_url(settings.urls[0])
    try:
        if settings.protocol != "auto":
            await _check_tls(settings)
            return settings.protocol
        v5 = await speaks_mqtt5(settings)
    except (OSError, TimeoutError) as err:
        raise _unreachable(settings, err) from err
    if not v5:
        log.info("broker %s does not speak MQTT 5 (it refused or closed an MQTT 5 CONNECT): using MQTT 3.1.1", where)
        return "3.1.1"
    log.debug("broker %s speaks MQTT 5", where)
    return "5"


async def speaks_mqtt5(settings: MqttSettings) -> bool:
    """Whether the broker answers a bare MQTT 5 CONNECT with an MQTT 5 CONNACK.

    Waits for the TCP (and TLS) connection and the first bytes of the answer, each at most ``connect_timeout``.

    Raises:
        OSError: The connection failed (refused, unreachable, TLS).
        TimeoutError: No connection or no answer in time.
    """
    url = parse_broker_url(settings.urls[0])
    context = tls_context(settings) if url.tls else None
    async with asyncio.timeout(settings.connect_timeout):
        reader, writer = await asyncio.open_connection(
            url.host, url.port, ssl=context, server_hostname=url.host if context else None
        )
    try:
        writer.write(_connect_v5(f"qmpnet-probe-{secrets.token_hex(6)}"))
        async with asyncio.timeout(settings.connect_timeout):
            await writer.drain()
            try:
                kind, length = await reader.readexactly(2)
                body = await reader.readexactly(length) if length < 0x80 else b""
            except asyncio.IncompleteReadError:
                return False  # closed without a word: the broker does not speak MQTT 5
        if kind >> 4 != _CONNACK >> 4 or length == 2:
            return False  # an MQTT 3.1.1 CONNACK (return code 1: unacceptable protocol version)
        if len(body) >= 2 and body[1] == _UNSUPPORTED_VERSION:
            return False
        if len(body) >= 2 and body[1] == 0:
            writer.write(b"\xe0\x00")  # DISCONNECT, normal: the broker forgets the probe's session at once
        return True
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(settings.connect_timeout):
                await writer.wait_closed()


async def _check_tls(settings: MqttSettings) -> None:
    """For ``mqtts://``, a TLS handshake of our own before the MQTT library's first one.

    paho leaves the socket of a failed handshake for the garbage collector; asyncio closes it, and its error
    says why (unknown CA, wrong host name) just as well. Plain ``mqtt://`` needs no check.

    Raises:
        OSError: The connection or the handshake failed (``ssl.SSLError`` is an ``OSError``).
        TimeoutError: Not within ``connect_timeout``.
    """
    url = parse_broker_url(settings.urls[0])
    if not url.tls:
        return
    context = tls_context(settings)
    async with asyncio.timeout(settings.connect_timeout):
        _, writer = await asyncio.open_connection(url.host, url.port, ssl=context, server_hostname=url.host)
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(settings.connect_timeout):
            await writer.wait_closed()


def _connect_v5(client_id: str) -> bytes:
    """An MQTT 5 CONNECT: clean start, 10 s keepalive, no properties, no credentials, no will."""
    ident = client_id.encode()
    variable = b"\x00\x04MQTT\x05\x02\x00\x0a\x00"
    payload = len(ident).to_bytes(2, "big") + ident
    body = variable + payload
    return bytes([0x10, len(body)]) + body


def explain(err: aiomqtt.MqttError, settings: MqttSettings, *, protocol: Version) -> BrokerUnavailable:
    """The :class:`BrokerUnavailable` describing why connecting (``Client.__aenter__``) failed with ``err``.

    ``aiomqtt`` raises a connect failure as ``MqttError(str(os_error)) from None``: the ``OSError`` is still the
    exception's ``__context__``, which tells a refused port from TLS from an unknown host.
    """
    where = redact_url(settings.urls[0])
    if isinstance(err, aiomqtt.MqttCodeError):  # at connect time: a negative CONNACK
        value = err.rc.value if isinstance(err.rc, ReasonCode) else err.rc
        reason = str(err.rc) if isinstance(err.rc, ReasonCode) else str(err)
        if value in _CREDENTIALS:
            return _error(where, "credentials", f"the broker refused our credentials: {reason!r}")
        if value in _PROTOCOL:
            return _error(where, "protocol", f"the broker does not speak MQTT {protocol}: {reason!r}")
        return _error(where, "refused", f"the broker refused the connection: {reason!r}")
    cause = err.__context__
    if isinstance(cause, OSError):
        return _unreachable(settings, cause)
    if "timed out" in str(err):
        return _error(where, "timeout", f"no answer within {settings.connect_timeout:g} s")
    return _error(where, "lost", str(err))


async def diagnose_timeout(err: BrokerUnavailable, settings: MqttSettings, *, protocol: Version) -> BrokerUnavailable:
    """For a forced MQTT 5 that timed out, ask the broker whether it speaks 5 at all; ``err`` otherwise."""
    if err.problem != "timeout" or protocol != "5":
        return err
    try:
        v5 = await speaks_mqtt5(settings)
    except (OSError, TimeoutError):
        return err
    if v5:
        return err
    return _error(
        redact_url(settings.urls[0]),
        "protocol",
        'the broker does not speak MQTT 5 (it closed the connection on an MQTT 5 CONNECT); set mqtt.protocol to '
        '"auto" or "3.1.1" (--mqtt-protocol)',
    )


def _unreachable(settings: MqttSettings, err: OSError | TimeoutError) -> BrokerUnavailable:
    where = redact_url(settings.urls[0])
    if isinstance(err, TimeoutError):
        return _error(where, "timeout", f"no answer within {settings.connect_timeout:g} s")
    if isinstance(err, ssl.SSLError):
        return _error(where, "tls", f"TLS failed: {err.reason or err}")
    if isinstance(err, ConnectionRefusedError):
        return _error(where, "refused", "nothing listens on that port (connection refused)")
    if isinstance(err, socket.gaierror):
        return _error(where, "unreachable", f"unknown host: {err.strerror or err}")
    return _error(where, "unreachable", err.strerror or str(err))


def _error(where: str, problem: BrokerProblem, why: str) -> BrokerUnavailable:
    return BrokerUnavailable(f"cannot connect to the broker at {where}: {why}", problem=problem)
