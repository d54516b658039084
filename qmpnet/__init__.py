"""qmpnet: change the network of running QEMU guests over QMP, without a reboot.

Direct use::

    async with qmpnet.connect("/run/vm1.qmp") as guest:
        nic = await guest.add_nic({"model": "virtio", "backend": {"type": "user"}})
        await guest.set_link(nic.id, up=False)
        await guest.remove_nic(nic.id)
"""

import logging

from qmpnet.api import connect
from qmpnet.errors import (
    BrokerUnavailable,
    Busy,
    Conflict,
    Forbidden,
    GuestUnavailable,
    InvalidRequest,
    NoFreeSlot,
    NotFound,
    NotVerified,
    OutcomeUnknown,
    QmpCommandError,
    QmpnetError,
    RemovalPending,
    Timeout,
    UnexpectedReply,
    Unsupported,
)
from qmpnet.guest import Guest
from qmpnet.model import (
    BridgeBackend,
    DgramBackend,
    GuestEvent,
    GuestView,
    HubportBackend,
    ModelInfo,
    NatBackend,
    Nic,
    NicSpec,
    RemoveResult,
    StreamBackend,
    TapBackend,
    UserBackend,
    VfioBackend,
)
from qmpnet.policy import Policy
from qmpnet.settings import Settings, load_settings

__version__ = "0.1.0"

__all__ = [
    "BridgeBackend",
    "BrokerUnavailable",
    "Busy",
    "Conflict",
    "DgramBackend",
    "Forbidden",
    "Guest",
    "GuestEvent",
    "GuestUnavailable",
    "GuestView",
    "HubportBackend",
    "InvalidRequest",
    "ModelInfo",
    "NatBackend",
    "Nic",
    "NicSpec",
    "NoFreeSlot",
    "NotFound",
    "NotVerified",
    "OutcomeUnknown",
    "Policy",
    "QmpCommandError",
    "QmpnetError",
    "RemovalPending",
    "RemoveResult",
    "Settings",
    "StreamBackend",
    "TapBackend",
    "Timeout",
    "UnexpectedReply",
    "Unsupported",
    "UserBackend",
    "VfioBackend",
    "__version__",
    "connect",
    "load_settings",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
