"""The contract with aiomqtt's undocumented behaviour (qmpnet/adapters/mqtt/aiomqtt_internals.py), and no privates.

The requester relies on ``aiomqtt.Client`` handing each message to its queue's ``put_nowait`` from paho's
``on_message`` callback, synchronously. These tests fail, saying what changed, when the pinned version no longer
does; and they check that no module of the MQTT adapter uses a private name of ``aiomqtt`` or ``paho``.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client
from paho.mqtt.client import MQTTMessage

from qmpnet.adapters import mqtt
from qmpnet.adapters.mqtt.aiomqtt_internals import dispatching_queue

PACKAGE = Path(mqtt.__file__).parent


def test_the_client_still_takes_a_queue_type() -> None:
    parameters = inspect.signature(aiomqtt.Client).parameters
    assert "queue_type" in parameters, "aiomqtt.Client no longer takes queue_type: dispatching_queue cannot be used"


async def test_a_message_reaches_the_dispatcher_inside_pahos_callback() -> None:
    seen: list[aiomqtt.Message] = []
    client = aiomqtt.Client("127.0.0.1", 1, queue_type=dispatching_queue(seen.append))  # never connected
    paho_client: Any = client._client
    assert isinstance(paho_client, paho.mqtt.client.Client), "aiomqtt.Client no longer wraps a paho Client"
    assert paho_client.on_message is not None, "aiomqtt no longer installs paho's on_message callback"
    message = MQTTMessage(mid=7, topic=b"qmpnet/c1/status")
    message.payload = b'{"state": "online"}'
    paho_client.on_message(paho_client, None, message)
    assert [(str(m.topic), m.payload) for m in seen] == [("qmpnet/c1/status", b'{"state": "online"}')], (
        "aiomqtt no longer hands a message to its queue's put_nowait from paho's on_message callback: "
        "the requester's ordering (qmpnet/adapters/mqtt/aiomqtt_internals.py) is lost"
    )


def _private_names(*classes: type[Any]) -> set[str]:
    names = {name for cls in classes for name in dir(cls) if name.startswith("_") and not name.startswith("__")}
    for cls in classes:
        for klass in cls.__mro__:
            if klass is object:
                continue
            source = inspect.getsource(klass)
            for node in ast.walk(ast.parse(inspect.cleandoc(source) if source.startswith(" ") else source)):
                if not isinstance(node, ast.Attribute) or not isinstance(node.value, ast.Name):
                    continue
                if node.value.id == "self" and node.attr.startswith("_") and not node.attr.startswith("__"):
                    names.add(node.attr)
    return names


def test_no_module_of_the_adapter_reaches_into_aiomqtt_or_paho() -> None:
    privates = _private_names(aiomqtt.Client, aiomqtt.Message, paho.mqtt.client.Client, MQTTMessage)
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            # self._x is the module's own attribute (no class of the adapter subclasses the libraries' classes).
            own = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
            if isinstance(node, ast.Attribute) and node.attr in privates and not own:
                found.setdefault(path.name, []).append(f"line {node.lineno}: .{node.attr}")
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(base).split("[")[0] for base in node.bases}
                assert not {b for b in bases if b.startswith(("aiomqtt", "paho")) or b in {"Client", "MQTTMessage"}}, (
                    f"{path.name}: class {node.name} subclasses a class of aiomqtt or paho"
                )
    assert found == {}, "private names of aiomqtt or paho used in adapters/mqtt/ (see aiomqtt_internals.py)"
