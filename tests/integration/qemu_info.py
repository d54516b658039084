"""What the QEMU on this machine is, as it says itself, so that no test names a QEMU version."""

from __future__ import annotations

import functools
import re
import subprocess

QEMU = "qemu-system-x86_64"


@functools.cache
def installed_qemu_version() -> str:
    """``major.minor.micro`` of the QEMU the tests start, from ``--version`` (the QMP greeting says the same)."""
    banner = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    match = re.search(r"QEMU emulator version (\d+\.\d+\.\d+)", banner)
    assert match, f"cannot read the version in {banner!r}"
    return match[1]
