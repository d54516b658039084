"""Prometheus metrics of ``qmpnet serve`` (opt-in: ``metrics.port``; bound to 127.0.0.1 unless told otherwise).

Metrics live in their own registry, not the process-wide default one, so several controllers (tests) can exist
in one process and nothing else's metrics leak onto the endpoint. Labels are bounded: ``op`` is one of the API's
ops or ``unknown``, ``status`` is ``ok`` or one of the closed list of error codes.

    qmpnet_requests_total{op,status}      requests answered
    qmpnet_request_seconds{op}            time from arrival to answer (histogram)
    qmpnet_guests{state}                  guests by connection state
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from collections.abc import Mapping
    from wsgiref.simple_server import WSGIServer

__all__ = ["Metrics"]

_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The controller's metrics; an :class:`~qmpnet.serve.controller.Observer`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "qmpnet_requests", "Requests answered, by op and status.", ["op", "status"], registry=self.registry
        )
        self._latency = Histogram(
            "qmpnet_request_seconds",
            "Seconds from a request's arrival to its answer.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._guests = Gauge("qmpnet_guests", "Guests by connection state.", ["state"], registry=self.registry)

    def request_done(self, op: str, outcome: str, seconds: float) -> None:
        """Count a finished request and its latency."""
        self._requests.labels(op=op, status=outcome).inc()
        self._latency.labels(op=op).observe(seconds)

    def guests_changed(self, states: Mapping[str, int]) -> None:
        """Set the number of guests in each state."""
        for state, count in states.items():
            self._guests.labels(state=state).set(count)

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; ``shutdown()`` the result to stop."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
