"""docs/asyncapi.yaml is what the code generates, describes every channel, and the AsyncAPI CLI finds it valid."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import needs
import yaml

from qmpnet.api.asyncapi import HEADER, asyncapi_document, render_asyncapi
from qmpnet.api.schema import api_schema
from qmpnet.api.wire.envelopes import EVENT_NAMES, OPS

DOCS = Path(__file__).parents[3] / "docs"
ASYNCAPI = DOCS / "asyncapi.yaml"
VALIDATE_TIMEOUT = 300  # the CLI is a Node program of 1,500 modules; a busy 2-core machine takes a while to load it


def test_the_checked_in_document_is_the_generated_one() -> None:
    assert ASYNCAPI.read_text() == render_asyncapi(), "out of date: qmpnet schema --asyncapi > docs/asyncapi.yaml"


def test_the_yaml_is_the_document() -> None:
    text = render_asyncapi()
    assert text.startswith(HEADER)
    assert "&id" not in text  # no anchors: every value is written where it is used
    assert yaml.safe_load(text) == asyncapi_document()


def test_every_op_is_received_and_answered_both_ways() -> None:
    doc = asyncapi_document()
    channels, operations = doc["channels"], doc["operations"]
    requests: dict[str, Any] = {}
    replies: set[str] = set()
    for operation in operations.values():
        channel = operation["channel"]["$ref"].removeprefix("#/channels/")
        if operation["action"] == "receive" and "reply" in operation:
            requests[channel] = operation
            reply = operation["reply"]
            assert reply["channel"] == {"$ref": "#/channels/reply"}
            assert reply["address"] == {"$ref": "#/components/replyAddresses/responseTopic"}
            replies.update(ref["$ref"].rsplit("/", 1)[1] for ref in reply["messages"])
    ops = {channels[name]["address"].split("/request/", 1)[1]: name for name in requests}
    assert set(ops) == set(OPS)
    assert channels["reply"]["address"] is None  # the caller's Response Topic
    assert replies == set(channels["reply"]["messages"])
    for op, name in ops.items():
        ident = name.removesuffix("Request")
        expected = "{root}/{controller}/request/" if OPS[op].scope == "controller" else "{root}/{controller}/guest/"
        assert channels[name]["address"].startswith(expected), name
        response = channels[f"{ident}Response"]
        assert response["address"] == channels[name]["address"].replace("/request/", "/response/")
        assert set(response["messages"]) == {f"{ident}Ok", "errorResponse"}
        senders = [o for o in operations.values() if o["channel"] == {"$ref": f"#/channels/{ident}Response"}]
        assert [o["action"] for o in senders] == ["send"], op


def test_state_events_and_desired_have_their_channels() -> None:
    doc = asyncapi_document()
    addresses = {channel["address"]: channel for channel in doc["channels"].values()}
    guest = "{root}/{controller}/guest/{guest}"
    assert set(addresses["{root}/{controller}/status"]["messages"]) == {"controllerOnline", "controllerOffline"}
    for address in (f"{guest}/status", f"{guest}/nics", f"{guest}/event/{{event}}", f"{guest}/desired"):
        assert address in addresses, address
    assert doc["components"]["parameters"]["event"]["enum"] == list(EVENT_NAMES)
    actions = {op["channel"]["$ref"].removeprefix("#/channels/"): op for op in doc["operations"].values()}
    assert actions["guestDesired"]["action"] == "receive"
    for name in ("controllerStatus", "guestStatus", "guestNics"):
        assert actions[name]["action"] == "send"
        assert actions[name]["bindings"]["mqtt"] == {"qos": 1, "retain": True, "bindingVersion": "0.2.0"}
    assert actions["guestEvent"]["bindings"]["mqtt"]["retain"] is False


def test_every_channel_parameter_is_declared() -> None:
    doc = asyncapi_document()
    for name, channel in doc["channels"].items():
        in_address = set(re.findall(r"{(\w+)}", channel["address"] or ""))
        assert set(channel.get("parameters", {})) == in_address, name
        for parameter in in_address:
            assert parameter in doc["components"]["parameters"]


def test_the_payloads_are_the_json_schema_of_the_models() -> None:
    """Every message of the JSON Schema is a payload here, with the same schema (only references moved)."""
    schema, doc = api_schema(), asyncapi_document()
    components: dict[str, Any] = doc["components"]["schemas"]
    for model, definition in schema["$defs"].items():
        moved = json.dumps(definition).replace('"#/$defs/', '"#/components/schemas/')
        # pydantic's OpenAPI-style discriminator object becomes AsyncAPI's: the property's name.
        moved = re.sub(r'"discriminator": \{"mapping": \{[^}]*\}, "propertyName": "(\w+)"\}', r'"discriminator": "\1"',
                       moved)  # fmt: skip
        assert json.loads(moved) == components[model], model
    payloads = {message["payload"]["$ref"].rsplit("/", 1)[1] for message in doc["components"]["messages"].values()}
    sections = ("x-requests", "x-responses", "x-state", "x-events", "x-desired")
    assert payloads == {ref["$ref"].rsplit("/", 1)[1] for section in sections for ref in schema[section].values()}
    assert components["NicAddRequest"]["additionalProperties"] is False


def test_correlation_by_transaction_and_by_correlation_data() -> None:
    doc = asyncapi_document()
    ids = doc["components"]["correlationIds"]
    assert ids["transaction"]["location"] == "$message.payload#/transaction"
    assert ids["correlationData"]["location"] == "$message.header#/correlationData"
    assert doc["components"]["replyAddresses"]["responseTopic"]["location"] == "$message.header#/responseTopic"
    messages = doc["components"]["messages"]
    state = {"controllerOnline", "controllerOffline", "guestStatus", "guestNics", "guestEvent", "desiredDocument"}
    for key, message in messages.items():
        expected = "correlationData" if key.endswith("Reply") else "transaction"
        if key in state:
            assert "correlationId" not in message, key
        else:
            assert message["correlationId"] == {"$ref": f"#/components/correlationIds/{expected}"}, key
    request = messages["nicAddRequest"]["bindings"]["mqtt"]
    assert set(request) == {"responseTopic", "correlationData", "bindingVersion"}
    assert set(messages["nicAddOkReply"]["bindings"]["mqtt"]) == {"correlationData", "bindingVersion"}


def test_servers_for_mqtt_5_and_3_1_1() -> None:
    servers = asyncapi_document()["servers"]
    assert {(s["protocol"], s["protocolVersion"]) for s in servers.values()} == {("mqtt", "5"), ("mqtt", "3.1.1")}
    for server in servers.values():
        will = server["bindings"]["mqtt"]["lastWill"]
        assert (will["topic"], json.loads(will["message"]), will["retain"]) == (
            "qmpnet/<c>/status", {"state": "offline"}, True
        )
    assert servers["mqtt5"]["bindings"]["mqtt"]["sessionExpiryInterval"] == 3600
    assert "sessionExpiryInterval" not in servers["mqtt311"]["bindings"]["mqtt"]


def validate(document: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """``asyncapi validate document``: its run and its diagnostics. Telemetry and the update check are off."""
    analytics = tmp_path / "asyncapi-analytics.json"
    analytics.write_text(json.dumps({"analyticsEnabled": "false", "infoMessageShown": "true", "userID": "qmpnet"}))
    diagnostics = tmp_path / "diagnostics.json"
    env = os.environ | {
        "ASYNCAPI_METRICS_CONFIG_PATH": str(analytics),  # the CLI's analytics settings: disabled
        "ASYNCAPI_SKIP_NEW_VERSION_CHECK": "true",  # no "update available" lookup on npm
    }
    argv = [str(needs.ASYNCAPI_CLI), "validate", str(document), "--diagnostics-format=json",
            f"--save-output={diagnostics}", "--fail-severity=warn"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=VALIDATE_TIMEOUT, check=False)
    assert json.loads(analytics.read_text())["analyticsEnabled"] == "false"
    found: list[dict[str, Any]] = json.loads(diagnostics.read_text()) if diagnostics.exists() else []
    return done, found


@needs.asyncapi_cli()
def test_the_asyncapi_cli_finds_the_document_valid(tmp_path: Path) -> None:
    done, diagnostics = validate(ASYNCAPI, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is valid" in done.stdout
    # Spectral's severities: 0 error, 1 warning, 2 information, 3 hint. Information left: "3.1.0 is out".
    assert [d for d in diagnostics if d["severity"] <= 1] == []


@needs.asyncapi_cli()
def test_the_asyncapi_cli_refuses_a_broken_document(tmp_path: Path) -> None:
    """The check can fail: the same document with one dangling reference is refused, with the error located."""
    broken = tmp_path / "asyncapi.yaml"
    text = render_asyncapi()
    assert "$ref: '#/components/schemas/Nic'\n" in text
    broken.write_text(text.replace("$ref: '#/components/schemas/Nic'\n", "$ref: '#/components/schemas/Nope'\n", 1))
    done, diagnostics = validate(broken, tmp_path)
    assert done.returncode != 0
    errors = [d for d in diagnostics if d["severity"] == 0]
    assert errors, diagnostics
    assert {d["code"] for d in errors} == {"invalid-ref"}, errors
