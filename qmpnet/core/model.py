"""The shared vocabulary: what a caller asks for (``NicSpec``) and what a guest has (``Nic``).

These pydantic models are the edge of qmpnet: the Python API, the CLI and the MQTT API all accept and return
exactly these shapes (docs/mqtt-api.md is generated from them), so validation happens once, here, and every
error names the JSON path of the field. The models are frozen and forbid unknown fields: a misspelt option is an
error, never silently ignored.

Inside qmpnet the core works on these validated objects and on a few plain dataclasses (``PciTopology``); raw QMP
dictionaries never get past the QMP adapter.

This module is where the models are imported from; they are defined by theme: :mod:`.model_base` (the frozen
base, the shared small types, field-named errors), :mod:`.backends`, :mod:`.shape_vlan` (a NIC's tap: shaping and
VLANs), :mod:`.nic_requests` (``NicSpec``, ``NicUpdate``) and :mod:`.observed` (``Nic``, the guest's view,
events and results).
"""

from qmpnet.core.backends import (
    TAP_BASED,
    Backend,
    BridgeBackend,
    DgramBackend,
    HubportBackend,
    InetAddress,
    MacvtapBackend,
    NatBackend,
    PasstBackend,
    SocketAddress,
    StreamBackend,
    TapBackend,
    UnixAddress,
    UserBackend,
    VfioBackend,
)
from qmpnet.core.model_base import (
    SUPPORTED_MODELS,
    LinkState,
    NicModel,
    NicState,
    Verify,
    invalid_request_from,
    validate_as,
)
from qmpnet.core.nic_requests import NicSpec, NicUpdate, parse_nic_spec, parse_nic_update
from qmpnet.core.observed import (
    BusCapacity,
    Capacity,
    CaptureResult,
    DiscardedRecord,
    GuestEvent,
    GuestEventName,
    GuestView,
    ModelCapacity,
    ModelInfo,
    Nic,
    ObservedBackend,
    PciAddress,
    RemoveResult,
    RxFilter,
    check_file_path,
)
from qmpnet.core.shape_vlan import Shape, Vlan

__all__ = [
    "SUPPORTED_MODELS",
    "TAP_BASED",
    "Backend",
    "BridgeBackend",
    "BusCapacity",
    "Capacity",
    "CaptureResult",
    "DgramBackend",
    "DiscardedRecord",
    "GuestEvent",
    "GuestEventName",
    "GuestView",
    "HubportBackend",
    "InetAddress",
    "LinkState",
    "MacvtapBackend",
    "ModelCapacity",
    "ModelInfo",
    "NatBackend",
    "Nic",
    "NicModel",
    "NicSpec",
    "NicState",
    "NicUpdate",
    "ObservedBackend",
    "PasstBackend",
    "PciAddress",
    "RemoveResult",
    "RxFilter",
    "Shape",
    "SocketAddress",
    "StreamBackend",
    "TapBackend",
    "UnixAddress",
    "UserBackend",
    "Verify",
    "VfioBackend",
    "Vlan",
    "check_file_path",
    "invalid_request_from",
    "parse_nic_spec",
    "parse_nic_update",
    "validate_as",
]
