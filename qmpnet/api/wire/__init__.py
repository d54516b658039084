"""The wire contract of the MQTT API: topics and message envelopes (docs/mqtt-api.md).

Pure: no I/O and no MQTT library. The controller, the Python client, the schema export, the CLI and the MQTT
adapter (:mod:`qmpnet.adapters.mqtt`) all speak it, so it sits below all of them rather than inside the adapter.
"""
