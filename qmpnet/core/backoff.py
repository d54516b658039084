"""Retry delays: capped exponential backoff with jitter, for every reconnect loop (QEMU monitors, brokers).

Pure: no I/O. The jitter keeps a fleet of controllers (or of guests behind one controller) from retrying in
lockstep after a shared outage.
"""

from __future__ import annotations

import random

__all__ = ["backoff"]


def backoff(low: float, high: float, failures: int) -> float:
    """Seconds to wait after ``failures`` failed attempts: ``low * 2**failures`` capped at ``high``, jittered.

    The delay is drawn uniformly from the upper half of that ceiling, so it never drops below half of it.
    """
    ceiling = min(high, low * 2.0 ** min(failures, 32))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography
