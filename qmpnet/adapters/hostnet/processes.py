"""Processes on the host, named for good: a pid and its start time (``/proc/<pid>/stat``, field 22).

A pid alone can be recycled by an unrelated process; with the start time (clock ticks after boot) it names one
process for the life of the boot. The host side names the passts it starts this way, and a guest's record names its
QEMU, so that a process that has gone is told from a new one that got its pid.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["start_time"]

_PROC = Path("/proc")


def start_time(pid: int) -> int | None:
    """The start time of live process ``pid`` (clock ticks after boot); ``None`` if it is gone or a zombie."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": the comm may hold spaces
    # Daemons are re-parented to PID 1, which need not reap them; a zombie serves nothing.
    return None if fields[0] in {"Z", "X"} else int(fields[19])
