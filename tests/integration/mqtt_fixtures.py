"""The MQTT test processes and probe, now in the package for the pytest plugin: imported from there.

Test modules keep importing ``from mqtt_fixtures import ...``; the code lives in :mod:`qmpnet.testguest.services`
(mosquitto, QEMU ``-S``, ``qmpnet serve``) and :mod:`qmpnet.testguest.probe` (the MQTT probe).
"""

from qmpnet.testguest.probe import Msg, Probe, retained, topic_matches, wait_online, wait_retained
from qmpnet.testguest.services import (
    FAST_ENV,
    NODELAY,
    Mosquitto,
    Process,
    Qemu,
    Serve,
    free_port,
    scratch,
    short_dir,
)

__all__ = [
    "FAST_ENV",
    "NODELAY",
    "Mosquitto",
    "Msg",
    "Probe",
    "Process",
    "Qemu",
    "Serve",
    "free_port",
    "retained",
    "scratch",
    "short_dir",
    "topic_matches",
    "wait_online",
    "wait_retained",
]
