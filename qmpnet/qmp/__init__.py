"""QMP adapter: the only package that imports ``qemu.qmp``."""

from qmpnet.qmp.monitor import QmpMonitor, is_unplug_in_progress, parse_address

__all__ = ["QmpMonitor", "is_unplug_in_progress", "parse_address"]
