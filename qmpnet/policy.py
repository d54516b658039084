"""Policy: what a caller may ask for, decided by the operator.

Anyone who can send QMP commands has QEMU's privileges, and a few backend options turn that into running
commands or touching files on the host: user-mode ``guestfwd`` with ``cmd:`` and ``smb`` start host programs,
and a listening unix socket makes QEMU unlink and create a file at a path of the caller's choosing. qmpnet
refuses these with ``forbidden`` unless the operator's policy allows them, so an MQTT caller can never do more
than the operator meant. The checks are pure and run before any QMP command is sent.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict, Field

from qmpnet.errors import Forbidden
from qmpnet.model import DgramBackend, NicSpec, StreamBackend, UnixAddress, UserBackend

__all__ = ["Policy", "check_spec"]


class Policy(BaseModel):
    """The operator's rules for what callers may request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_host_commands: bool = Field(
        default=False, description="Allow options that run host programs (guestfwd 'cmd:', smb)."
    )
    allowed_socket_dirs: list[str] | None = Field(
        default=None,
        description="Directories under which stream/dgram unix sockets may live; null allows any path.",
    )


def check_spec(spec: NicSpec, policy: Policy) -> None:
    """Refuse anything in ``spec`` that ``policy`` does not allow.

    Raises:
        Forbidden: Names the field and the policy setting that refuses it.
    """
    backend = spec.backend
    if isinstance(backend, UserBackend) and not policy.allow_host_commands:
        for index, rule in enumerate(backend.guestfwd):
            if "cmd:" in rule:
                raise Forbidden(
                    f"nic.backend.guestfwd.{index}: 'cmd:' forwards run a host command; the policy does not "
                    "allow host commands (policy.allow_host_commands)",
                    field=f"nic.backend.guestfwd.{index}",
                )
        if backend.smb is not None:
            raise Forbidden(
                "nic.backend.smb: smb starts a host smbd; the policy does not allow host commands "
                "(policy.allow_host_commands)",
                field="nic.backend.smb",
            )
    for name, addr in _unix_addresses(backend):
        _check_socket_dir(f"nic.backend.{name}.path", addr.path, policy)


def _unix_addresses(backend: object) -> list[tuple[str, UnixAddress]]:
    found: list[tuple[str, UnixAddress]] = []
    if isinstance(backend, StreamBackend) and isinstance(backend.addr, UnixAddress):
        found.append(("addr", backend.addr))
    if isinstance(backend, DgramBackend):
        found.extend((n, a) for n, a in (("local", backend.local), ("remote", backend.remote))
                     if isinstance(a, UnixAddress))
    return found


def _check_socket_dir(field: str, path: str, policy: Policy) -> None:
    if policy.allowed_socket_dirs is None:
        return
    target = PurePosixPath(path)
    if not any(target.is_relative_to(PurePosixPath(d)) for d in policy.allowed_socket_dirs):
        allowed = ", ".join(policy.allowed_socket_dirs) or "none"
        raise Forbidden(
            f"{field}: {path} is outside the directories the policy allows for sockets ({allowed})", field=field
        )
