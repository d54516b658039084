"""QMP adapter: the only package that imports ``qemu.qmp``."""

from qmpnet.adapters.qmp.monitor import QmpMonitor, parse_address

__all__ = ["QmpMonitor", "parse_address"]
