"""``qmpnet serve`` without a broker: settings, the bad-config exit, log format, request refusals, metrics."""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path

import pytest

from qmpnet.adapters.mqtt.bus import check_payload
from qmpnet.core.model import parse_nic_spec
from qmpnet.core.policy import Policy, check_spec
from qmpnet.errors import Forbidden, InvalidRequest
from qmpnet.serve.compose import JsonFormatter, main, serve_settings
from qmpnet.serve.metrics import Metrics
from qmpnet.settings import (
    BrokerUrl,
    LaneSettings,
    MqttSettings,
    Settings,
    default_controller_id,
    load_settings,
    parse_broker_url,
    redact_url,
)


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("mqtt://broker", BrokerUrl(tls=False, host="broker", port=1883, username=None, password=None)),
        ("mqtts://broker", BrokerUrl(tls=True, host="broker", port=8883, username=None, password=None)),
        ("mqtt://127.0.0.1:18830", BrokerUrl(tls=False, host="127.0.0.1", port=18830, username=None, password=None)),
        ("mqtts://u:p%40ss@b:1", BrokerUrl(tls=True, host="b", port=1, username="u", password="p@ss")),  # noqa: S106
        ("mqtt://[::1]:1883/", BrokerUrl(tls=False, host="::1", port=1883, username=None, password=None)),
    ],
)
def test_broker_urls(url: str, parsed: BrokerUrl) -> None:
    assert parse_broker_url(url) == parsed


@pytest.mark.parametrize("url", ["http://b", "broker:1883", "mqtt://", "mqtt://b:99999", "mqtt://b/x", "mqtt://b?q"])
def test_bad_broker_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"mqtt|port|host|understood"):
        parse_broker_url(url)


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MqttSettings().controller_id == default_controller_id()
    assert MqttSettings().max_payload == 65536
    assert MqttSettings().protocol == "auto"
    monkeypatch.setenv("QMPNET_MQTT__BROKER", "mqtts://b:8884")
    monkeypatch.setenv("QMPNET_MQTT__PASSWORD", "s3cret")
    monkeypatch.setenv("QMPNET_CONTROLLER__GUESTS", '{"vm1": "/run/vm1.qmp"}')
    settings = load_settings()
    assert settings.mqtt.broker == "mqtts://b:8884"
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.controller.guests == {"vm1": "/run/vm1.qmp"}


def test_toml_file_and_flags_merge(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('[mqtt]\ncontroller_id = "h7"\n[controller.guests]\nvm1 = "/run/vm1.qmp"\n')
    settings = load_settings(config, controller={"guests": {"vm2": "/run/vm2.qmp"}})
    assert settings.mqtt.controller_id == "h7"
    assert settings.controller.guests == {"vm1": "/run/vm1.qmp", "vm2": "/run/vm2.qmp"}


def test_one_broker_or_a_list_tried_in_order() -> None:
    assert MqttSettings().urls == ("mqtt://127.0.0.1:1883",)
    assert MqttSettings(broker="mqtt://a:1").urls == ("mqtt://a:1",)
    both = MqttSettings(brokers=["mqtt://a:1", "mqtts://b:2"])
    assert both.urls == ("mqtt://a:1", "mqtts://b:2")
    assert both.at("mqtts://b:2").urls == ("mqtts://b:2",)
    assert both.at("mqtts://b:2").controller_id == both.controller_id


def test_a_flag_or_the_environment_replaces_the_file_s_broker_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('[mqtt]\nbrokers = ["mqtt://n1:1883", "mqtt://n2:1883"]\n')
    assert load_settings(config).mqtt.urls == ("mqtt://n1:1883", "mqtt://n2:1883")
    assert load_settings(config, mqtt={"broker": "mqtt://flag:1"}).mqtt.urls == ("mqtt://flag:1",)
    monkeypatch.setenv("QMPNET_MQTT__BROKER", "mqtt://env:1")
    assert load_settings(config).mqtt.urls == ("mqtt://env:1",)
    assert load_settings(config, mqtt={"brokers": ["mqtt://f1:1", "mqtt://f2:1"]}).mqtt.urls == (
        "mqtt://f1:1",
        "mqtt://f2:1",
    )
    monkeypatch.setenv("QMPNET_MQTT__BROKERS", '["mqtt://env2:1"]')  # both in one source: an error
    with pytest.raises(InvalidRequest, match=r"^settings\.mqtt: broker and brokers are both given"):
        load_settings(config)


@pytest.mark.parametrize(
    ("config", "flags", "message"),
    [
        ('[mqtt]\nbroker = "http://x"\n', {}, "settings.mqtt.broker"),
        ('[mqtt]\ncontroller_id = "a/b"\n', {}, "settings.mqtt.controller_id"),
        ('[mqtt]\ncontroller_id = "h1.lab"\n', {}, "settings.mqtt.controller_id: 'h1.lab' is not a valid name"),
        ('[mqtt]\ntopic_root = "fleet.lab"\n', {}, "settings.mqtt.topic_root: 'fleet.lab': use topic levels"),
        ('[mqtt]\nprotocol = "4"\n', {}, "settings.mqtt.protocol"),
        ("[mqtt]\nbrokr = 1\n", {}, "settings.mqtt.brokr"),
        ("[mqtt\n", {}, "config"),
        ("", {"guests": ["vm1"]}, "--guest"),
        ("", {"guests": ["bad name=/x"]}, "settings.controller.guests"),
        ("", {"guests": ["vm.1=/x"]}, "settings.controller.guests.vm.1.[key]: 'vm.1' is not a valid name"),
        ("", {"controller_id": "h1.lab"}, "settings.mqtt.controller_id: 'h1.lab' is not a valid name"),
        ("", {"brokers": ["tcp://x"]}, "settings.mqtt.brokers.0: 'tcp://x': the scheme must be"),
        ('[mqtt]\nbroker = "mqtt://a"\nbrokers = ["mqtt://b"]\n', {}, "settings.mqtt: broker and brokers are both"),
        ("[mqtt]\nbrokers = []\n", {}, "settings.mqtt.brokers: Tuple should have at least 1 item"),
        ('[mqtt]\nca_file = "/nonexistent/ca.crt"\n', {}, "settings.mqtt.ca_file"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, flags: dict[str, object], message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config)
    assert main(path, **flags) == 2  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.startswith(f"error: invalid_request: {message}")
    assert err.count("\n") == 1


def test_a_missing_config_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(tmp_path / "nope.toml") == 2
    assert "is not a readable file" in capsys.readouterr().err


def test_json_log_lines_carry_guest_and_transaction() -> None:
    record = logging.LogRecord(
        "qmpnet.serve.controller", logging.INFO, __file__, 1, "guest %s: %s", ("vm1", "ok"), None
    )
    record.guest = "vm1"
    record.transaction = "t-9"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "guest vm1: ok"
    assert (line["level"], line["logger"], line["guest"], line["transaction"]) == (
        "INFO",
        "qmpnet.serve.controller",
        "vm1",
        "t-9",
    )


@pytest.mark.parametrize(
    ("payload", "retained", "words"),
    [
        (b"x" * 70_000, False, "limit"),
        (b"{oops", False, "not JSON"),
        (b'{"a": Infinity}', False, "not JSON"),
        (b'"text"', False, "JSON object"),
        (b'{"transaction": "r"}', True, "retained"),
    ],
)
def test_the_bus_refuses_before_the_controller_sees_it(payload: bytes, retained: bool, words: str) -> None:
    refusal, _ = check_payload(payload, retained=retained, limit=MqttSettings().max_payload)
    assert isinstance(refusal, InvalidRequest)
    assert words in refusal.message


def test_the_bus_passes_a_json_object() -> None:
    assert check_payload(b'{"transaction": "t"}', retained=False, limit=1000) == (None, {"transaction": "t"})


@pytest.mark.parametrize(
    "payload",
    [
        b'{"a": [1, 2.5, null, true], "b": "\\u00e9"}', '{"a": 1}'.encode("utf-16"), '{"a": 1}'.encode("utf-32-le"),
        b'\xef\xbb\xbf{"a": 1}', b"\xef\xbb\xbf\xef\xbb\xbf{}", b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": "\xff"}',
        b"{oops", b"", b"  ", b'{"a": 1} x', b"[1, 2]", b'"\\ud800"',
    ],
)
def test_the_bus_reads_a_payload_as_json_loads_does(payload: bytes) -> None:
    def no_constant(name: str) -> object:
        raise ValueError(f"{name} is not valid JSON")

    try:
        expected: object = ("value", json.loads(payload, parse_constant=no_constant))
    except ValueError as err:
        expected = ("error", f"the payload is not JSON: {err}")
    refusal, data = check_payload(payload, retained=True, limit=1000)  # retained: whatever was read comes back
    assert refusal is not None
    assert (("error", refusal.message) if data is None else ("value", data)) == expected


def test_metrics_endpoint_on_loopback() -> None:
    metrics = Metrics()
    metrics.request_done("nic/add", "ok", 0.004)
    server = metrics.serve("127.0.0.1", 0)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'qmpnet_requests_total{op="nic/add",status="ok"} 1.0' in text
    assert 'qmpnet_request_seconds_bucket{le="0.005",op="nic/add"} 1.0' in text


def test_settings_keep_existing_sections() -> None:
    settings = Settings()
    assert settings.qmp.command_timeout > 0
    assert settings.metrics.port is None
    assert settings.metrics.host == "127.0.0.1"


def test_the_records_operation_window_follows_the_dedup_window_unless_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings().lane.operation_window == MqttSettings().dedup_window == 60
    assert Settings(mqtt=MqttSettings(dedup_window=5)).lane.operation_window == 5
    assert Settings(mqtt={"dedup_window": 5}, lane={"operation_window": 9}).lane.operation_window == 9
    assert Settings(mqtt={"dedup_window": 5}, lane=LaneSettings(max_waiting=3)).lane.operation_window == 5
    config = tmp_path / "serve.toml"
    config.write_text("[mqtt]\ndedup_window = 7\n")
    assert load_settings(config).lane.operation_window == 7
    monkeypatch.setenv("QMPNET_LANE__OPERATION_WINDOW", "8")
    assert load_settings(config).lane.operation_window == 8


def test_the_example_config_is_valid() -> None:
    example = Path(__file__).parents[3] / "contrib" / "examples" / "serve.toml"
    settings = load_settings(example, mqtt={"ca_file": None})  # the example's CA file is not on this machine
    assert all(url.startswith("mqtts://") for url in settings.mqtt.urls)
    assert settings.controller.guest_dir is not None
    assert settings.log.format == "json"


def test_serve_gives_remote_callers_no_bridge_unless_listed() -> None:
    spec = parse_nic_spec({"backend": {"type": "bridge", "bridge": "br0"}})
    check_spec(spec, Settings().policy)  # direct mode: any existing bridge
    with pytest.raises(Forbidden) as caught:
        check_spec(spec, serve_settings(Settings()).policy)
    assert caught.value.field == "nic.backend.bridge"
    listed = serve_settings(Settings(policy=Policy(allowed_bridges=["br0"])))
    check_spec(spec, listed.policy)


@pytest.mark.parametrize(
    ("host", "made"),
    [("h1", "h1"), ("h1.lab.example", "h1-lab-example"), ("web_1", "web_1"), ("über", "ber"), ("", "qmpnet"),
     ("...", "qmpnet"), ("a" * 80, "a" * 64)],
)  # fmt: skip
def test_the_default_controller_id_is_the_host_name_made_topic_safe(
    monkeypatch: pytest.MonkeyPatch, host: str, made: str
) -> None:
    monkeypatch.setattr("platform.node", lambda: host)
    assert default_controller_id() == made
    assert MqttSettings().controller_id == default_controller_id()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mqtt://qmp:s3cret@broker:1883", "mqtt://qmp:***@broker:1883"),
        ("mqtts://u:p%40ss@b", "mqtts://u:***@b"),
        ("mqtt://:only@b:1", "mqtt://:***@b:1"),
        ("mqtt://user@b:1", "mqtt://user@b:1"),
        ("mqtt://b:1", "mqtt://b:1"),
    ],
)
def test_passwords_in_broker_urls_are_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_bad_broker_url_is_reported_without_its_password() -> None:
    with pytest.raises(ValueError, match="Port out of range") as caught:
        parse_broker_url("mqtt://u:t0psecret@broker:99999")
    assert "t0psecret" not in str(caught.value)
    assert "u:***@broker" in str(caught.value)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_stuck_after_is_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    assert load_settings().unplug.stuck_after == 60.0
    monkeypatch.setenv("QMPNET_UNPLUG__STUCK_AFTER", value)
    with pytest.raises(InvalidRequest, match=r"^settings\.unplug\.stuck_after: ") as caught:
        load_settings()
    assert caught.value.field == "settings.unplug.stuck_after"
    monkeypatch.setenv("QMPNET_UNPLUG__STUCK_AFTER", "1.5")
    assert load_settings().unplug.stuck_after == 1.5
