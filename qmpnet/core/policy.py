"""Policy: what a caller may ask for, decided by the operator.

Anyone who can send QMP commands has QEMU's privileges, and a few backend options turn that into running
commands or touching files on the host: user-mode ``guestfwd`` with ``cmd:`` and ``smb`` start host programs,
a listening unix socket makes QEMU unlink and create a file at a path of the caller's choosing, QEMU's bridge
helper is a setuid program, and bridges, taps and PCI functions are host resources the operator hands out. qmpnet
refuses these with ``forbidden`` unless the operator's policy allows them, so an MQTT caller can never do more
than the operator meant. The checks are pure and run before any QMP command is sent.
"""

# Without `from __future__ import annotations`: pydantic would compile each field's annotation from its string,
# ~70 k instructions a field in every new process (docs/performance.md).

from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Annotated

from pydantic import Field
from pydantic.fields import FieldInfo

from qmpnet.core import backends
from qmpnet.core.model_base import Frozen
from qmpnet.core.nic_requests import NicSpec, NicUpdate
from qmpnet.errors import Forbidden

__all__ = ["Policy", "check_capture_file", "check_spec", "check_update"]


def _allow_list(what: str, *, any_: str = "any", serve: str = "") -> FieldInfo:
    """Describe an allow-list setting: ``what`` callers may use, and what null allows (``any_``).

    ``serve`` is the setting's default under ``qmpnet serve``, when that is not null.
    """
    default_under_serve = f" ('qmpnet serve' defaults to {serve})" if serve else ""
    info: FieldInfo = Field(description=f"{what}; null allows {any_}{default_under_serve}.")
    return info


class Policy(Frozen):
    """The operator's rules for what callers may request."""

    allow_host_commands: bool = Field(
        default=False, description="Allow options that run host programs (guestfwd 'cmd:', smb)."
    )
    allowed_socket_dirs: Annotated[
        list[str] | None, _allow_list("Directories under which stream/dgram unix sockets may live", any_="any path")
    ] = None
    allowed_bridges: Annotated[
        list[str] | None,
        _allow_list("Host bridges bridge-mode NICs may join", any_="any existing bridge", serve="none"),
    ] = None
    allow_bridge_helper: bool = Field(
        default=False, description="Allow bridge NICs made by QEMU's setuid bridge helper (runs a host program)."
    )
    allowed_taps: Annotated[list[str] | None, _allow_list("Existing taps callers may attach to")] = None
    allowed_macvtap_links: Annotated[
        list[str] | None, _allow_list("Host links macvtap NICs may sit on", any_="any existing link", serve="none")
    ] = None
    allowed_vfio_hosts: Annotated[
        list[str] | None, _allow_list("Host PCI functions callers may assign (0000:03:00.0)")
    ] = None
    allowed_capture_dirs: Annotated[
        list[str] | None,
        _allow_list("Directories under which QEMU may write capture files", any_="any path", serve="none"),
    ] = None


def check_spec(spec: NicSpec, policy: Policy) -> None:
    """Refuse anything in ``spec`` that ``policy`` does not allow.

    Raises:
        Forbidden: Names the field and the policy setting that refuses it.
    """
    backend = spec.backend
    if isinstance(backend, backends.UserBackend) and not policy.allow_host_commands:
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
    _check_host_backend(backend, policy)


def _check_host_backend(backend: object, policy: Policy) -> None:
    match backend:
        case backends.BridgeBackend(helper=True) if not policy.allow_bridge_helper:
            _refuse("nic.backend.helper", "QEMU's bridge helper runs a host program", "policy.allow_bridge_helper")
        case backends.BridgeBackend(bridge=bridge):
            _check_listed("nic.backend.bridge", bridge, policy.allowed_bridges, "policy.allowed_bridges")
        case backends.TapBackend(ifname=ifname):
            _check_listed("nic.backend.ifname", ifname, policy.allowed_taps, "policy.allowed_taps")
        case backends.MacvtapBackend(link=link):
            _check_listed("nic.backend.link", link, policy.allowed_macvtap_links, "policy.allowed_macvtap_links")
        case backends.VfioBackend(host=host):
            _check_listed("nic.backend.host", host, policy.allowed_vfio_hosts, "policy.allowed_vfio_hosts")


def _check_listed(field: str, value: str, allowed: list[str] | None, setting: str) -> None:
    if allowed is not None and value not in allowed:
        listed = ", ".join(allowed) or "none"
        _refuse(field, f"{value!r} is not allowed by the policy (allowed: {listed})", setting)


def _refuse(field: str, why: str, setting: str) -> None:
    raise Forbidden(f"{field}: {why} ({setting})", field=field)


def _unix_addresses(backend: object) -> list[tuple[str, backends.UnixAddress]]:
    found: list[tuple[str, backends.UnixAddress]] = []
    if isinstance(backend, backends.StreamBackend) and isinstance(backend.addr, backends.UnixAddress):
        found.append(("addr", backend.addr))
    if isinstance(backend, backends.DgramBackend):
        found.extend((n, a) for n, a in (("local", backend.local), ("remote", backend.remote))
                     if isinstance(a, backends.UnixAddress))
    return found


def _check_socket_dir(field: str, path: str, policy: Policy) -> None:
    _check_inside(field, path, policy.allowed_socket_dirs, "sockets")


def _check_inside(field: str, path: str, allowed_dirs: Sequence[str] | None, what: str, setting: str = "") -> None:
    """Refuse ``path`` unless it is inside one of ``allowed_dirs`` (``None``: anywhere)."""
    if allowed_dirs is None:
        return
    target = PurePosixPath(path)
    if not any(target.is_relative_to(PurePosixPath(d)) for d in allowed_dirs):
        allowed = ", ".join(allowed_dirs) or "none"
        raise Forbidden(
            f"{field}: {path} is outside the directories the policy allows for {what} ({allowed}){setting}",
            field=field,
        )


def check_update(update: NicUpdate, policy: Policy) -> None:
    """Refuse a live change that ``policy`` does not allow: a move obeys the rules of a hot-add.

    Raises:
        Forbidden: Names the field and the policy setting that refuses it.
    """
    if isinstance(update.backend, backends.BridgeBackend):
        _check_listed("update.backend.bridge", update.backend.bridge, policy.allowed_bridges, "policy.allowed_bridges")


def check_capture_file(path: str, policy: Policy, *, field: str = "file") -> None:
    """Refuse a capture file outside the directories ``policy`` allows (QEMU creates or truncates it).

    Raises:
        Forbidden: The file is outside ``policy.allowed_capture_dirs``.
    """
    _check_inside(field, path, policy.allowed_capture_dirs, "captures", " (policy.allowed_capture_dirs)")
