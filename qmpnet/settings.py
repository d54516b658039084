"""Settings: every timeout, limit and policy in one frozen pydantic-settings model.

Values come from (highest first) explicit arguments, ``QMPNET_...`` environment variables (nested with ``__``,
e.g. ``QMPNET_QMP__COMMAND_TIMEOUT=5``) and a TOML file. Every timeout and limit of the guest lane, the adapters,
the controller, the MQTT client and the command line is a setting here. What the code still spells out is poll
intervals (how often to look again, never how long to wait), and the waits of the test-guest harness
(:mod:`qmpnet.testguest`) and of ``qmpnet demo``, which runs on it: arguments with defaults sized for a TCG boot.
"""

# Without `from __future__ import annotations`: pydantic would compile each field's annotation from its string,
# ~70 k instructions a field in every new process (docs/performance.md).

import platform
from pathlib import Path
from typing import Annotated, Any, Final, Literal, NamedTuple, Self
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from qmpnet.core.hostconfig import HostnetSettings
from qmpnet.core.model import invalid_request_from
from qmpnet.core.model_base import Frozen
from qmpnet.core.names import BUS_NAME_PATTERN, BUS_NAME_RULE, check_bus_name, safe_bus_name
from qmpnet.core.policy import Policy
from qmpnet.errors import InvalidRequest

__all__ = [
    "BUS_NAME_PATTERN",
    "DEFAULT_BROKER",
    "BrokerUrl",
    "ControllerSettings",
    "LaneSettings",
    "LogSettings",
    "MetricsSettings",
    "MqttProtocol",
    "MqttSettings",
    "QgaSettings",
    "QmpSettings",
    "ReconcileSettings",
    "Settings",
    "UnplugSettings",
    "UpdateSettings",
    "default_controller_id",
    "load_settings",
    "parse_broker_url",
    "redact_url",
]


#: A duration in seconds, more than zero.
Seconds = Annotated[float, Field(gt=0)]
#: A duration in seconds, zero allowed (zero: do not wait).
SecondsOrZero = Annotated[float, Field(ge=0)]


class QmpSettings(Frozen):
    """Talking to one QEMU monitor."""

    connect_timeout: Seconds = Field(default=5.0, description="Seconds to connect and negotiate.")
    command_timeout: Seconds = Field(
        default=10.0, description="Seconds to wait for a command's answer before reporting outcome_unknown."
    )
    unplug_timeout: SecondsOrZero = Field(
        default=10.0, description="Default seconds remove waits for DEVICE_DELETED before removal_pending."
    )
    rollback_unplug_timeout: SecondsOrZero = Field(
        default=5.0, description="Seconds a rollback waits for a NIC it added to be unplugged again."
    )
    read_attempts: int = Field(
        default=3,
        ge=1,
        description="Reads of a guest to try when another QMP client changes its devices while it is read.",
    )


class QgaSettings(Frozen):
    """Talking to one guest's qemu-guest-agent (the guest view and verified changes)."""

    connect_timeout: Seconds = Field(
        default=3.0, description="Seconds to connect to the agent socket and get its guest-sync answer."
    )
    command_timeout: Seconds = Field(default=5.0, description="Seconds to wait for one agent command's answer.")
    verify_timeout: Seconds = Field(
        default=30.0, description="Seconds a verified change waits for the guest to show it before not_verified."
    )
    poll_interval: Seconds = Field(
        default=0.2, description="Seconds between two looks at the guest while verifying (no agent events)."
    )


class LaneSettings(Frozen):
    """The per-guest request lane."""

    max_waiting: int = Field(default=256, ge=1, description="Requests that may wait for a guest before 'busy'.")
    max_wait: Seconds = Field(default=60.0, description="Seconds a request may wait for a guest before 'busy'.")
    stop_grace: SecondsOrZero = Field(
        default=10.0, description="Seconds operations in flight may take to finish when qmpnet stops."
    )
    operation_window: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a finished operation (its id and outcome) stays in the guest's record, so that a "
        "repeated request is answered from it, also after a restart. Unset, it follows mqtt.dedup_window.",
    )


class UnplugSettings(Frozen):
    """Removals the guest does not acknowledge: when one counts as stuck (``unplug_stuck``, docs/errors.md)."""

    stuck_after: float = Field(
        default=60.0, gt=0, allow_inf_nan=False,
        description="Seconds an unplug may stay removal_pending (from QEMU accepting device_del) before the "
        "controller publishes unplug_stuck for it, once.",
    )  # fmt: skip


class UpdateSettings(Frozen):
    """Live changes of a NIC (``nic/update``): the link flap of a move and QEMU's self-announcement."""

    link_flap: float = Field(
        default=1.0, ge=0, le=60,
        description="Seconds a moved NIC's link stays down, so that the guest notices and renews DHCP (e1000 "
        "guests poll their link every ~2 s).",
    )  # fmt: skip
    announce_rounds: int = Field(default=5, ge=1, le=100, description="announce-self: announcements sent.")
    announce_initial: int = Field(default=50, ge=1, le=100_000, description="announce-self: first gap, ms.")
    announce_max: int = Field(default=550, ge=1, le=100_000, description="announce-self: longest gap, ms.")
    announce_step: int = Field(default=100, ge=1, le=10_000, description="announce-self: gap increase, ms.")


BusName = Annotated[str, AfterValidator(check_bus_name)]
#: ``auto``: MQTT 5, or 3.1.1 when the broker refuses 5; ``5`` and ``3.1.1`` force a version.
MqttProtocol = Literal["auto", "5", "3.1.1"]


class BrokerUrl(NamedTuple):
    """A parsed ``mqtt://`` or ``mqtts://`` broker URL."""

    tls: bool
    host: str
    port: int
    username: str | None
    password: str | None


def parse_broker_url(url: str) -> BrokerUrl:
    """Split ``mqtt[s]://[user[:password]@]host[:port]`` (ports default to 1883 and 8883).

    Raises:
        ValueError: Another scheme, no host, or a bad port.
    """
    parts = urlsplit(url)
    shown = redact_url(url)  # an error names the URL, never its password
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{shown!r}: the scheme must be mqtt:// or mqtts://")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{shown!r}: only mqtt[s]://[user[:password]@]host[:port] is understood")
    try:
        port = parts.port
    except ValueError as err:
        raise ValueError(f"{shown!r}: {err}") from err
    if not parts.hostname:
        raise ValueError(f"{shown!r}: no host")
    tls = parts.scheme == "mqtts"
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return BrokerUrl(tls, parts.hostname, port or (8883 if tls else 1883), username, password)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs, errors and labels; unparseable URLs unchanged."""
    try:
        parts = urlsplit(url)
        password = parts.password
        hostinfo = parts.netloc.rpartition("@")[2]
    except ValueError:
        return url
    if password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{hostinfo}"))


def _check_broker_url(url: str) -> str:
    parse_broker_url(url)
    return url


BrokerUrlStr = Annotated[str, AfterValidator(_check_broker_url)]
#: Where clients and the controller connect when no broker is configured.
DEFAULT_BROKER: Final = "mqtt://127.0.0.1:1883"


def _check_topic_root(root: str) -> str:
    if not all(map(_is_bus_level, root.split("/"))):
        raise ValueError(f"{root!r}: use topic levels of {BUS_NAME_RULE}, separated by '/'")
    return root


def _is_bus_level(level: str) -> bool:
    try:
        check_bus_name(level)
    except ValueError:
        return False
    return True


def default_controller_id() -> str:
    """The host name made fit for a topic level: ``h1.lab.example`` becomes ``h1-lab-example`` (BUS_NAME_RULE)."""
    return safe_bus_name(platform.node(), "qmpnet")


class MqttSettings(Frozen):
    """The broker connection and the MQTT API's limits (docs/mqtt-api.md)."""

    broker: BrokerUrlStr | None = Field(
        default=None,
        description=f"One broker: mqtt://host:port, or mqtts://host:port for TLS (default {DEFAULT_BROKER}). "
        "The same as brokers = [URL]; give one of the two.",
    )
    brokers: tuple[BrokerUrlStr, ...] | None = Field(
        default=None,
        min_length=1,
        description="Several brokers (the nodes of one cluster), tried in this order: when the connection to one "
        "is lost or cannot be made, the next is tried (with the reconnect backoff).",
    )
    controller_id: BusName = Field(
        default_factory=default_controller_id,
        description="This controller's id in topics (default: the host name, '.' and other characters made '-').",
    )
    topic_root: Annotated[str, AfterValidator(_check_topic_root)] = Field(
        default="qmpnet", description="First topic level(s)."
    )
    protocol: MqttProtocol = Field(
        default="auto", description="MQTT version: auto (5, falling back to 3.1.1 once if refused), 5 or 3.1.1."
    )
    username: str | None = Field(default=None, description="Broker user name.")
    password: SecretStr | None = Field(default=None, description="Broker password.")
    ca_file: FilePath | None = Field(default=None, description="CA bundle to verify the broker (mqtts).")
    cert_file: FilePath | None = Field(default=None, description="Client certificate (mqtts).")
    key_file: FilePath | None = Field(default=None, description="Client certificate's key (mqtts).")
    keepalive: int = Field(default=30, ge=5, le=3600, description="Seconds between MQTT keepalive pings.")
    connect_timeout: Seconds = Field(default=10.0, description="Seconds to connect to the broker.")
    reconnect_min: Seconds = Field(default=0.5, description="First delay before reconnecting to the broker.")
    reconnect_max: Seconds = Field(default=10.0, description="Longest delay between broker reconnects.")
    max_refusals: int = Field(
        default=3, ge=1, description="Refusals in a row (bad credentials, protocol not spoken) before giving up."
    )
    session_expiry: int = Field(
        default=3600,
        ge=0,
        le=0xFFFFFFFF,
        description="Seconds the broker keeps the controller's session and queues its requests while it is away "
        "(MQTT 5; a 3.1.1 broker decides itself). 0: no persistent session.",
    )
    max_inflight: int = Field(default=20, ge=1, description="QoS 1 messages sent and not yet acknowledged, at most.")
    outbox_limit: int = Field(
        default=10_000, ge=10, description="Answers and events kept while the broker is away; the oldest go first."
    )
    state_interval: SecondsOrZero = Field(
        default=0.0,
        description="Least seconds between two publishes of one retained topic (a guest's status, its NIC list): "
        "a change within them goes out at their end, as the latest state only, after the events it caused. "
        "0: every change at once, before its events.",
    )
    shutdown_timeout: Seconds = Field(
        default=2.0, description="Seconds a stopping controller waits for its last messages to be acknowledged."
    )
    dedup_window: SecondsOrZero = Field(
        default=60.0, description="Seconds a request's transaction id is remembered per guest."
    )
    max_payload: int = Field(default=64 * 1024, ge=256, description="Largest request payload, in bytes.")
    request_timeout: Seconds = Field(default=30.0, description="Seconds a client waits for an answer.")
    remove_margin: SecondsOrZero = Field(
        default=5.0, description="Seconds a client adds to a nic/del's own timeout when waiting for its answer."
    )

    @model_validator(mode="after")
    def _one_way_to_name_brokers(self) -> Self:
        if self.broker is not None and self.brokers is not None:
            raise ValueError(
                "broker and brokers are both given: give one URL as broker, or the list to try in order as brokers"
            )
        return self

    @property
    def urls(self) -> tuple[str, ...]:
        """The broker URLs to try, in order: ``brokers``, or ``broker``, or the default."""
        return self.brokers or (self.broker or DEFAULT_BROKER,)

    def at(self, url: str) -> Self:
        """These settings with ``url`` (one of :attr:`urls`) as the only broker: one connection attempt's view."""
        return self.model_copy(update={"broker": url, "brokers": None})


class ControllerSettings(Frozen):
    """The fleet of guests one controller serves."""

    guests: dict[BusName, str] = Field(
        default_factory=dict, description="Guest name -> QMP socket (unix path or host:port)."
    )
    guest_dir: Path | None = Field(
        default=None,
        description="Every *.qmp socket in it is a guest named by its stem; a NAME.qga beside it is its guest agent.",
    )
    agents: dict[BusName, str] = Field(
        default_factory=dict,
        description="Guest name -> its qemu-guest-agent socket (when QEMU's query-chardev cannot tell it).",
    )
    discovery_interval: Seconds = Field(default=1.0, description="Seconds between scans of guest_dir.")
    backoff_min: Seconds = Field(default=0.2, description="First delay before reconnecting to a QEMU.")
    backoff_max: Seconds = Field(default=10.0, description="Longest delay between QEMU reconnects.")
    first_reads: int = Field(
        default=32, ge=1,
        description="Guests read at once when they connect (recovery and the first NIC list): a fleet that "
        "connects together is read a few at a time, which keeps the controller's memory flat.",
    )  # fmt: skip


class ReconcileSettings(Frozen):
    """Desired state: how the controller converges each guest to its desired NIC set."""

    repair: bool = Field(
        default=True, description="Add back a desired NIC that disappeared (false: only report the drift)."
    )
    resync_interval: Seconds = Field(
        default=60.0, description="Seconds between full re-reads of each guest (catches what events miss)."
    )


class MetricsSettings(Frozen):
    """Prometheus metrics (off unless a port is given)."""

    port: int | None = Field(default=None, ge=0, le=65535, description="Serve /metrics on this port (opt-in).")
    host: str = Field(default="127.0.0.1", description="Address the metrics endpoint binds to.")


class LogSettings(Frozen):
    """Logging of ``qmpnet serve``."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per line.")


class Settings(BaseSettings):
    """All of qmpnet's settings."""

    model_config = SettingsConfigDict(
        env_prefix="QMPNET_", env_nested_delimiter="__", extra="forbid", frozen=True, toml_file=None
    )

    state_dir: Path = Field(
        default=Path("/var/lib/qmpnet"),
        description="The state store: what qmpnet created, intends and holds per guest (env QMPNET_STATE_DIR).",
    )
    boot_id_file: Path = Field(
        default=Path("/proc/sys/kernel/random/boot_id"),
        description="Where the kernel's boot id is read: records of the state store from another boot are void.",
    )
    qmp: QmpSettings = Field(default_factory=QmpSettings)
    lane: LaneSettings = Field(default_factory=LaneSettings)
    policy: Policy = Field(default_factory=Policy)
    hostnet: HostnetSettings = Field(default_factory=HostnetSettings)
    update: UpdateSettings = Field(default_factory=UpdateSettings)
    unplug: UnplugSettings = Field(default_factory=UnplugSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    reconcile: ReconcileSettings = Field(default_factory=ReconcileSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    qga: QgaSettings = Field(default_factory=QgaSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no .env files
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no secret dirs
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then environment, then the TOML file (when one is configured)."""
        return (
            init_settings,
            _BrokersGiveWay(env_settings, (init_settings,)),
            _TomlFile(settings_cls, (init_settings, env_settings)),
        )

    @model_validator(mode="before")
    @classmethod
    def _operation_window_follows_dedup(cls, data: Any) -> Any:  # noqa: ANN401 - pydantic input
        """An unset ``lane.operation_window`` takes ``mqtt.dedup_window`` when that is set.

        The records used to keep operations for ``mqtt.dedup_window``; a configuration that set only that keeps
        its meaning, and every transaction the controller de-duplicates can still be answered from the record.
        """
        if not isinstance(data, dict):
            return data
        window = _explicit(data.get("mqtt"), MqttSettings, "dedup_window")
        if window is None or _explicit(data.get("lane"), LaneSettings, "operation_window") is not None:
            return data
        lane = data.get("lane")
        given = lane.model_dump(exclude_unset=True) if isinstance(lane, LaneSettings) else dict(lane or {})
        return {**data, "lane": {**given, "operation_window": window}}



# ``mqtt.broker`` and ``mqtt.brokers`` are two spellings of one setting: ``--broker`` or ``QMPNET_MQTT__BROKER``
# replaces a file's ``brokers`` list (flags, then environment, then the file) instead of being merged with it into
# "both are given". Within one source, both given is an error (MqttSettings).
_BROKER_KEYS: Final = ("broker", "brokers")


def _names_brokers(values: dict[str, Any]) -> bool:
    mqtt = values.get("mqtt")
    return isinstance(mqtt, dict) and any(mqtt.get(key) is not None for key in _BROKER_KEYS)


def _give_way(values: dict[str, Any], higher: tuple[PydanticBaseSettingsSource, ...]) -> dict[str, Any]:
    """``values`` without their broker URLs when a source that comes first names some."""
    if _names_brokers(values) and any(_names_brokers(source()) for source in higher):
        return {**values, "mqtt": {k: v for k, v in values["mqtt"].items() if k not in _BROKER_KEYS}}
    return values


class _BrokersGiveWay(PydanticBaseSettingsSource):
    """A settings source whose broker URLs give way to those of the sources that come first."""

    def __init__(self, source: PydanticBaseSettingsSource, higher: tuple[PydanticBaseSettingsSource, ...]) -> None:
        super().__init__(source.settings_cls)
        self.source = source
        self.higher = higher

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """The wrapped source's answer."""
        return self.source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        """The wrapped source's values (see :func:`_give_way`)."""
        return _give_way(self.source(), self.higher)


class _TomlFile(TomlConfigSettingsSource):
    """The TOML file (``model_config["toml_file"]``), whose broker URLs give way to the flags' and environment's."""

    def __init__(self, settings_cls: type[BaseSettings], higher: tuple[PydanticBaseSettingsSource, ...]) -> None:
        super().__init__(settings_cls)
        self.higher = higher

    def __call__(self) -> dict[str, Any]:
        """The file's values (see :func:`_give_way`)."""
        return _give_way(super().__call__(), self.higher)


def _explicit(section: object, model: type[BaseModel], name: str) -> object:
    """The value of setting ``name`` if ``section`` (a dict or a ``model``) sets it explicitly, else ``None``."""
    if isinstance(section, model):
        return getattr(section, name) if name in section.model_fields_set else None
    if isinstance(section, dict):
        return section.get(name)
    return None


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:  # noqa: ANN401 - pydantic input
    """Load settings from ``config`` (TOML), the environment and ``overrides``.

    Raises:
        InvalidRequest: The file is missing or a value is invalid; the message names the setting.
    """
    if config is not None and not config.is_file():
        raise InvalidRequest(f"config: {config} is not a readable file", field="config")
    try:
        if config is None:
            return Settings(**overrides)  # no file: no subclass to build (a schema build costs ~10 ms per command)

        class _FromFile(Settings):
            model_config = SettingsConfigDict(toml_file=config)

        return Settings.model_validate(_FromFile(**overrides).model_dump())
    except ValidationError as err:
        raise invalid_request_from(err, "settings") from err
    except ValueError as err:  # TOML syntax errors
        raise InvalidRequest(f"config: {config}: {err}", field="config") from err
