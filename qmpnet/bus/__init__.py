"""The MQTT adapter: topics, message envelopes, and the broker connection.

``topics`` and ``envelopes`` are pure and shared with the controller, the Python client and the schema export.
Only :mod:`qmpnet.bus.mqtt` (the broker connection) and :mod:`qmpnet.bus.requester` (the client side) import
``aiomqtt``; its exceptions never get past them. This ``__init__`` imports neither, so importing the envelopes
does not pull in the MQTT library.
"""
