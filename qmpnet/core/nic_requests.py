"""What a caller asks of a NIC: a hot-add (:class:`NicSpec`) and a live change (:class:`NicUpdate`)."""

# Without `from __future__ import annotations`: pydantic would compile each field's annotation from its string,
# ~70 k instructions a field in every new process (docs/performance.md).

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator, model_validator

from qmpnet.core.backends import TAP_BASED, Backend, BridgeBackend, NatBackend, UserBackend
from qmpnet.core.model_base import BUILT_ON_FIRST_USE, Frozen, LinkState, Mac, NicModel, QemuId, validate_as
from qmpnet.core.mtu import MTU_DESCRIPTION, MTU_UPDATE_DESCRIPTION, Mtu, check_mtu_backend
from qmpnet.core.names import parse_pci_addr
from qmpnet.core.nic_filter import NicFilter, check_filterable
from qmpnet.core.shape_vlan import Shape, Vlan
from qmpnet.errors import InvalidRequest

_MODEL_ALIASES = {"virtio": "virtio-net-pci"}


def _model_alias(value: object) -> object:
    return _MODEL_ALIASES.get(value, value) if isinstance(value, str) else value


class NicSpec(Frozen):
    """What a caller asks for when hot-adding a NIC. Every field but ``model`` has a sensible default."""

    model: Annotated[NicModel, BeforeValidator(_model_alias)] = "virtio-net-pci"
    id: QemuId | None = Field(default=None, description="Device id; generated when absent.")
    mac: Mac | None = Field(default=None, description="MAC address; a free 52:54:00:xx:xx:xx when absent.")
    addr: str | None = Field(default=None, description="PCI 'slot[.function]' (hex, as QEMU reads it).")
    bus: QemuId | None = Field(default=None, description="PCI bus id: pci.0, a pcie-root-port or a bridge.")
    vectors: int | None = Field(default=None, ge=0, le=2048, description="MSI-X vectors (virtio only).")
    queues: int | None = Field(default=None, ge=1, le=256, description="Queue pairs (virtio, tap backends).")
    link: LinkState = "up"
    backend: Backend = Field(default_factory=UserBackend)
    vlan: Vlan | None = Field(
        default=None, description="VLANs of the NIC's tap port on a VLAN-filtering bridge (tap-based backends)."
    )
    shape: Shape | None = Field(
        default=None, description="Bandwidth and impairment on the NIC's host tap (tap-based backends)."
    )
    mtu: Mtu | None = Field(default=None, description=MTU_DESCRIPTION)
    filter: NicFilter | None = Field(
        default=None, description="Anti-spoofing: the source MAC and addresses the guest may use (bridge, nat)."
    )

    @field_validator("addr")
    @classmethod
    def _check_addr(cls, value: str | None) -> str | None:
        if value is not None:
            parse_pci_addr(value)
        return value

    @model_validator(mode="after")
    def _check_model_options(self) -> "NicSpec":
        if self.filter is not None:
            check_filterable(self.backend, field="nic.filter")
        if self.backend.type == "vfio":
            return self._check_vfio()
        if self.model != "virtio-net-pci":
            for name in ("vectors", "queues"):
                if getattr(self, name) is not None:
                    raise InvalidRequest(f"nic.{name}: only virtio-net-pci supports it", field=f"nic.{name}")
        if (self.queues or 1) > 1 and self.backend.type not in TAP_BASED:
            raise InvalidRequest(
                "nic.queues: queues > 1 needs a tap-based backend (bridge, nat, tap, macvtap), not "
                f"{self.backend.type}",
                field="nic.queues",
            )
        check_mtu_backend(self.mtu, self.backend)
        self._check_tap_options()
        return self

    def _check_tap_options(self) -> None:
        """VLANs and shaping need a host tap qmpnet knows on a bridge."""
        for name in ("vlan", "shape"):
            if getattr(self, name) is None:
                continue
            if self.backend.type not in TAP_BASED or getattr(self.backend, "helper", False):
                raise InvalidRequest(
                    f"nic.{name}: needs a host tap qmpnet knows (bridge, nat or tap backend, not "
                    f"{'a bridge helper' if self.backend.type == 'bridge' else self.backend.type})",
                    field=f"nic.{name}",
                )
            if self.backend.type == "macvtap":
                raise InvalidRequest(
                    f"nic.{name}: a macvtap sits on no bridge and qmpnet does not shape it; use a bridge backend",
                    field=f"nic.{name}",
                )

    def _check_vfio(self) -> "NicSpec":
        # The assigned function is the NIC: QEMU emulates nothing, so there is no model, MAC, queue or link to set.
        check_mtu_backend(self.mtu, self.backend)
        for name in ("model", "mac", "vectors", "queues", "link"):
            # A default value is no request: a spec read back from the state store has every field, defaults included.
            if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default:
                raise InvalidRequest(
                    f"nic.{name}: a vfio NIC is the host device itself; {name} cannot be set", field=f"nic.{name}"
                )
        return self

    @property
    def driver(self) -> str:
        """The QEMU device driver: the model, or ``vfio-pci`` for direct assignment."""
        return "vfio-pci" if self.backend.type == "vfio" else self.model

    @property
    def pci_addr(self) -> tuple[int, int] | None:
        """The requested ``(slot, function)``, if any."""
        return parse_pci_addr(self.addr) if self.addr is not None else None



def parse_nic_spec(data: Mapping[str, Any] | NicSpec, *, prefix: str = "nic") -> NicSpec:
    """Validate ``data`` into a :class:`NicSpec`.

    Raises:
        InvalidRequest: A field is invalid; ``field`` holds its JSON path (``nic.backend.hostfwd.0``) and the
            message says why.
    """
    return validate_as(NicSpec, data, prefix)


class NicUpdate(Frozen):
    """A live change of a NIC: move it, tag it, shape it, filter it, set its link or MTU; the guest keeps its interface.

    Fields left out are kept as they are. ``vlan: null`` puts the port back to the bridge's default (untagged, in
    its default VLAN); ``shape: null`` removes all shaping; ``filter`` replaces the anti-spoofing rules in one step
    (bridge and nat NICs), ``filter: null`` removes them. ``backend``, ``vlan``, ``shape`` and ``mtu`` need a NIC
    whose backend is a host tap (bridge, nat or tap); every NIC accepts ``link``. A move re-enslaves the tap, flaps the
    link so that the guest renews DHCP, and announces the guest (``announce-self``); the port starts in the new
    bridge's default VLAN unless ``vlan`` is given too.
    """

    model_config = BUILT_ON_FIRST_USE

    id: QemuId = Field(description="The NIC's id.")
    backend: Annotated[BridgeBackend | NatBackend, Field(discriminator="type")] | None = Field(
        default=None, description="Move the NIC: the bridge or NAT network to join."
    )
    vlan: Vlan | None = Field(default=None, description="VLAN membership; null: the bridge's default.")
    shape: Shape | None = Field(default=None, description="Rate, burst, delay, jitter, loss; null: none.")
    link: LinkState | None = Field(default=None, description="Set the link up or down.")
    mtu: Mtu | None = Field(default=None, description=MTU_UPDATE_DESCRIPTION)
    filter: NicFilter | None = Field(default=None, description="Anti-spoofing filter; null: none.")

    @model_validator(mode="after")
    def _something_to_change(self) -> "NicUpdate":
        if not self.model_fields_set - {"id"}:
            raise InvalidRequest("update: nothing to change; give backend, vlan, shape, filter, link or mtu",
                                 field="update")
        if "mtu" in self.model_fields_set and self.mtu is None:
            raise InvalidRequest("update.mtu: give the MTU, 68-65535", field="update.mtu")
        if "backend" in self.model_fields_set and self.backend is None:
            raise InvalidRequest("update.backend: give the bridge or NAT network to move to", field="update.backend")
        if isinstance(self.backend, BridgeBackend) and self.backend.helper:
            raise InvalidRequest(
                "update.backend.helper: a move re-enslaves the NIC's tap; QEMU's bridge helper cannot be used",
                field="update.backend.helper",
            )
        return self

    @property
    def changes_vlan(self) -> bool:
        """Whether the update sets the VLAN (to a value or, with ``vlan: null``, back to the default)."""
        return "vlan" in self.model_fields_set

    @property
    def changes_shape(self) -> bool:
        """Whether the update sets the shaping (to a value or, with ``shape: null``, to none)."""
        return "shape" in self.model_fields_set

    @property
    def changes_filter(self) -> bool:
        """Whether the update sets the anti-spoofing filter (to a value or, with ``filter: null``, to none)."""
        return "filter" in self.model_fields_set



def parse_nic_update(data: Mapping[str, Any] | NicUpdate, *, prefix: str = "update") -> NicUpdate:
    """Validate ``data`` into a :class:`NicUpdate`.

    Raises:
        InvalidRequest: A field is invalid; ``field`` holds its JSON path (``update.shape.rate``) and the message
            says why.
    """
    return validate_as(NicUpdate, data, prefix)
