"""The guest agent's answers as pydantic models, parsed here so no raw agent dictionary leaves the adapter.

The models *ignore* unknown fields, unlike qmpnet's request models: these are another program's answers, and
qemu-guest-agent adds members across versions (``statistics`` in 2.11, ``out-truncated`` in 4.0 ...). A newer
agent must not turn the guest view into ``None``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ExecStarted", "ExecStatus", "FileRead", "IpAddress", "NetworkInterface"]


class _Reply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class IpAddress(_Reply):
    """One address of an interface (``GuestIpAddress``)."""

    type: Literal["ipv4", "ipv6"] = Field(alias="ip-address-type")
    address: str = Field(alias="ip-address")
    prefix: int = Field(ge=0, le=128)

    @property
    def cidr(self) -> str:
        """``address/prefix``, e.g. ``10.0.2.15/24``."""
        return f"{self.address}/{self.prefix}"


class NetworkInterface(_Reply):
    """One entry of ``guest-network-get-interfaces`` (``GuestNetworkInterface``)."""

    name: str
    hardware_address: str | None = Field(default=None, alias="hardware-address")
    ip_addresses: list[IpAddress] = Field(default_factory=list, alias="ip-addresses")


class ExecStarted(_Reply):
    """The answer of ``guest-exec``."""

    pid: int


class ExecStatus(_Reply):
    """The answer of ``guest-exec-status``; the output members come once the process has exited."""

    exited: bool
    exitcode: int | None = None
    signal: int | None = None
    out_data: str = Field(default="", alias="out-data")
    err_data: str = Field(default="", alias="err-data")


class FileRead(_Reply):
    """The answer of ``guest-file-read``."""

    count: int
    buf_b64: str = Field(alias="buf-b64")
    eof: bool
