"""The MQTT adapter: the only package that imports ``aiomqtt`` and ``paho``.

:mod:`.broker` is the client for the settings (the MQTT-version probe, why a connect failed), :mod:`.outbox` keeps
what the broker has not acknowledged yet, in order, :mod:`.bus` is the controller's session loop (requests in,
answers and state out) and :mod:`.requester` is the client side (reconnects, answers matched by transaction);
:mod:`.aiomqtt_internals` holds the one reliance on aiomqtt beyond its documented API. The
topics and envelopes they speak are the pure wire contract in :mod:`qmpnet.api.wire`. ``aiomqtt``'s exceptions
never get past this package; this ``__init__`` imports nothing, so importing it does not pull in the MQTT library.
"""
