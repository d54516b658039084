"""Measuring TCP throughput between namespaces (or a guest) with plain sockets, for the shaping tests.

A rate limit is checked by the rate a bulk TCP transfer actually gets through it, measured where the bytes
arrive: :func:`receive_bulk` times the transfer from its first byte to the last one it expects; :func:`send_bulk`
times it from the first byte sent to the peer's close, which a receiver that exits at end of stream (busybox
``nc -l``) gives only once it has read everything. Test modules import this as ``from throughput import ...``.
"""

from __future__ import annotations

import socket
import time

__all__ = ["CHUNK", "Measured", "receive_bulk", "send_bulk"]

CHUNK = 64 * 1024


class Measured:
    """Bytes moved and the seconds they took."""

    def __init__(self, size: int, seconds: float) -> None:
        self.size = size
        self.seconds = seconds

    @property
    def bits_per_second(self) -> float:
        return self.size * 8 / self.seconds if self.seconds > 0 else float("inf")

    def __repr__(self) -> str:
        return f"{self.size} bytes in {self.seconds:.2f} s = {self.bits_per_second / 1e6:.2f} Mbit/s"


def receive_bulk(server: socket.socket, expect: int, timeout: float) -> Measured:
    """Accept one connection on ``server`` and read ``expect`` bytes; time them from the first byte received."""
    server.settimeout(timeout)
    with server:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout)
            first = conn.recv(CHUNK)
            started = time.monotonic()
            got = len(first)
            while first and got < expect:
                chunk = conn.recv(CHUNK)
                if not chunk:
                    break
                got += len(chunk)
            measured = Measured(got - len(first), time.monotonic() - started)
            while conn.recv(CHUNK):  # the rest, so that closing does not reset the sender's connection
                pass
            return measured


def send_bulk(host: str, port: int, total: int, timeout: float) -> Measured:
    """Connect, send ``total`` bytes, half-close, and time it until the peer closes after reading them all."""
    payload = b"\0" * CHUNK
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.settimeout(timeout)
        started = time.monotonic()
        sent = 0
        while sent < total:
            sent += conn.send(payload[: min(CHUNK, total - sent)])
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(CHUNK):
            pass
        return Measured(sent, time.monotonic() - started)
