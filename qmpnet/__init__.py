"""qmpnet: change the network of running QEMU guests over QMP, without a reboot.

Direct use::

    async with qmpnet.connect("/run/vm1.qmp") as guest:
        nic = await guest.add_nic({"model": "virtio", "backend": {"type": "user"}})
        await guest.set_link(nic.id, up=False)
        await guest.remove_nic(nic.id)

The names below are loaded on first use (PEP 562): ``import qmpnet.cli`` (every ``qmpnet`` command starts there)
does not pay for the lane, the models and the QMP adapter unless the command needs them (docs/performance.md).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qmpnet.core.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from qmpnet.api.direct import connect
    from qmpnet.core.model import (
        BridgeBackend,
        Capacity,
        DgramBackend,
        GuestEvent,
        GuestView,
        HubportBackend,
        MacvtapBackend,
        ModelInfo,
        NatBackend,
        Nic,
        NicSpec,
        PasstBackend,
        RemoveResult,
        StreamBackend,
        TapBackend,
        UserBackend,
        VfioBackend,
    )
    from qmpnet.core.policy import Policy
    from qmpnet.errors import *  # noqa: F403 - the type checker reads the error tree; __all__ below limits it
    from qmpnet.guest.guest import Guest
    from qmpnet.settings import Settings, load_settings

__version__ = "0.1.0"

#: Where each public name lives.
_EXPORTS: dict[str, str] = {
    "connect": "qmpnet.api.direct",
    "Guest": "qmpnet.guest.guest",
    "Policy": "qmpnet.core.policy",
    "Settings": "qmpnet.settings",
    "load_settings": "qmpnet.settings",
    "PasstBackend": "qmpnet.core.model",
    **dict.fromkeys(
        ("BrokerUnavailable", "Busy", "Conflict", "Forbidden", "GuestUnavailable", "InvalidRequest", "NoFreeSlot",
         "NotFound",
         "NotVerified", "OutcomeUnknown", "QmpCommandError", "QmpnetError", "RemovalPending", "StoreUnavailable",
         "Timeout", "UnexpectedReply", "Unsupported"),
        "qmpnet.errors",
    ),
    **dict.fromkeys(
        ("BridgeBackend", "Capacity", "DgramBackend", "GuestEvent", "GuestView", "HubportBackend", "MacvtapBackend",
         "ModelInfo",
         "NatBackend", "Nic", "NicSpec", "RemoveResult", "StreamBackend", "TapBackend", "UserBackend", "VfioBackend"),
        "qmpnet.core.model",
    ),
}

__all__ = [
    "BridgeBackend",
    "BrokerUnavailable",
    "Busy",
    "Capacity",
    "Conflict",
    "DgramBackend",
    "Forbidden",
    "Guest",
    "GuestEvent",
    "GuestUnavailable",
    "GuestView",
    "HubportBackend",
    "InvalidRequest",
    "MacvtapBackend",
    "ModelInfo",
    "NatBackend",
    "Nic",
    "NicSpec",
    "NoFreeSlot",
    "NotFound",
    "NotVerified",
    "OutcomeUnknown",
    "PasstBackend",
    "Policy",
    "QmpCommandError",
    "QmpnetError",
    "RemovalPending",
    "RemoveResult",
    "Settings",
    "StoreUnavailable",
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


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


logging.getLogger(__name__).addHandler(logging.NullHandler())
