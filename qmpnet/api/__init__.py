"""What callers of qmpnet program against, apart from the CLI.

:mod:`.direct` is direct mode (``qmpnet.connect``: one guest over its QMP socket), ``wire/`` is the MQTT API's
contract (topics, envelopes; pure) and :mod:`.schema` exports its JSON Schema. The MQTT client stays at
``qmpnet.client``, its documented import path. This ``__init__`` imports nothing, so the pure wire contract can be
imported without the lane.
"""
