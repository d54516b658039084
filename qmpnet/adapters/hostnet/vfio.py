"""Direct assignment (VFIO): is a PCI function ready to hand to QEMU, and (on request) bind it to ``vfio-pci``.

QEMU's ``device_add vfio-pci host=...`` needs the function bound to ``vfio-pci`` and its whole IOMMU group
*viable*: the kernel refuses a group in which some member is driven by a host driver, because that driver and
the guest would share DMA isolation. The kernel counts as harmless a member that is unbound, bound to
``vfio-pci`` or ``pci-stub``, or a PCI bridge (whatever its driver, usually ``pcieport``), and so does
:func:`check_vfio`, so its errors come before QEMU's and name the culprit.

With ``rebind`` the caller asks qmpnet to move the *requested* function itself to ``vfio-pci`` (never other group
members): :func:`bind_vfio` uses the kernel's ``driver_override`` (write ``vfio-pci``, unbind from the current
driver, ``drivers_probe``) and returns the original driver, which :func:`restore_driver` rebinds after the NIC
is removed.

Everything goes through :class:`Sysfs`, rooted at a configurable directory: tests point it at a fake tree, and
a subclass can stand in for the kernel's reaction to writes. These calls are short blocking file operations.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from qmpnet.errors import InvalidRequest, NotFound, QmpnetError, Unsupported

__all__ = ["GroupMember", "Sysfs", "VfioDevice", "bind_vfio", "check_vfio", "parse_pci_host", "restore_driver"]

log = logging.getLogger(__name__)

FIELD = "nic.backend.host"
VFIO_DRIVER = "vfio-pci"
#: Drivers the kernel accepts on the other members of a group handed to VFIO.
_VIABLE_DRIVERS = frozenset({VFIO_DRIVER, "pci-stub"})
_NETWORK_CLASS = 0x02
_BRIDGE_SUBCLASS = 0x0604
_PCI_HOST = re.compile(r"(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])")


def parse_pci_host(value: str, *, field: str = FIELD) -> str:
    """Return the PCI address ``value`` (``0000:03:00.0`` or ``03:00.0``) as ``dddd:bb:ss.f`` in lower case.

    Raises:
        InvalidRequest: Not of that form, or the slot is above 0x1f.
    """
    match = _PCI_HOST.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidRequest(f"{field}: {value!r} is not a PCI address such as 0000:03:00.0", field=field)
    domain, bus, slot, function = match.groups()
    if int(slot, 16) > 0x1F:
        raise InvalidRequest(f"{field}: {value!r}: the slot must be at most 1f", field=field)
    return f"{(domain or '0000').lower()}:{bus.lower()}:{slot.lower()}.{function}"


class Sysfs:
    """The parts of sysfs that VFIO checks read and write, under ``root`` (``/sys`` on a real host).

    Args:
        root: The sysfs mount point, or a fake tree with the same layout.
    """

    def __init__(self, root: Path = Path("/sys")) -> None:
        self.root = root

    def device(self, address: str) -> Path:
        """The directory of PCI function ``address``."""
        return self.root / "bus/pci/devices" / address

    def driver_dir(self, driver: str) -> Path:
        """The directory of PCI driver ``driver``."""
        return self.root / "bus/pci/drivers" / driver

    def driver(self, address: str) -> str | None:
        """The driver ``address`` is bound to, or ``None``."""
        return _link_name(self.device(address) / "driver")

    def pci_class(self, address: str) -> int:
        """The 24-bit class code of ``address`` (``0x020000`` for an Ethernet controller)."""
        return int(self.read(self.device(address) / "class"), 16)

    def iommu_group(self, address: str) -> str | None:
        """The IOMMU group of ``address``, or ``None`` without an IOMMU."""
        return _link_name(self.device(address) / "iommu_group")

    def group_members(self, group: str) -> list[str]:
        """The PCI addresses in IOMMU group ``group``, sorted."""
        return sorted(entry.name for entry in (self.root / "kernel/iommu_groups" / group / "devices").iterdir())

    def read(self, path: Path) -> str:
        """The stripped text of sysfs file ``path``."""
        return path.read_text().strip()

    def write(self, path: Path, text: str) -> None:
        """Write ``text`` to sysfs file ``path`` in one write (what sysfs attributes expect)."""
        with path.open("w") as file:
            file.write(text)


@dataclass(frozen=True)
class GroupMember:
    """A PCI function in the same IOMMU group."""

    address: str
    driver: str | None
    pci_class: int


@dataclass(frozen=True)
class VfioDevice:
    """A PCI function checked for direct assignment.

    Attributes:
        address: Normalized PCI address.
        iommu_group: Its IOMMU group number.
        driver: The driver it is bound to now.
        members: Every function in the group, itself included.
        needs_rebind: It is not on ``vfio-pci`` yet: :func:`bind_vfio` must run before ``device_add``.
    """

    address: str
    iommu_group: str
    driver: str | None
    members: tuple[GroupMember, ...]
    needs_rebind: bool


def check_vfio(host: str, *, rebind: bool = False, sysfs: Sysfs | Path = Path("/sys")) -> VfioDevice:
    """Check that PCI function ``host`` can be given to a guest with ``device_add vfio-pci``.

    Raises:
        InvalidRequest: ``host`` is malformed, is not a network controller, or is not bound to ``vfio-pci`` and
            ``rebind`` is false.
        NotFound: No such PCI function.
        Unsupported: It has no IOMMU group (no or disabled IOMMU), another group member is bound to a host
            driver (the message names it and its driver), or ``rebind`` is asked and ``vfio-pci`` is not loaded.
    """
    fs = _sysfs(sysfs)
    address = _existing(host, fs)
    try:
        return _check(fs, address, rebind=rebind)
    except OSError as err:
        raise QmpnetError(f"{FIELD}: reading sysfs for {address} failed: {err}", field=FIELD) from err


def _check(fs: Sysfs, address: str, *, rebind: bool) -> VfioDevice:
    pci_class = fs.pci_class(address)
    if pci_class >> 16 != _NETWORK_CLASS:
        raise InvalidRequest(f"{FIELD}: {address} is not a network controller (class {pci_class:#08x}, network is "
                             "0x02xxxx)", field=FIELD)
    group = fs.iommu_group(address)
    if group is None:
        raise Unsupported(f"{FIELD}: {address} has no IOMMU group: the host has no IOMMU or it is off (boot with "
                          "intel_iommu=on or amd_iommu=on)", field=FIELD)
    members = tuple(GroupMember(m, fs.driver(m), fs.pci_class(m)) for m in fs.group_members(group))
    for member in members:
        if member.address != address and not _viable(member):
            raise Unsupported(
                f"{FIELD}: IOMMU group {group} of {address} also holds {member.address}, bound to host driver "
                f"{member.driver}; every function in the group must be unbound or on {VFIO_DRIVER} "
                "(qmpnet rebinds only the function asked for)",
                field=FIELD,
            )
    driver = fs.driver(address)
    needs_rebind = driver != VFIO_DRIVER
    if needs_rebind and not rebind:
        raise InvalidRequest(f"{FIELD}: {address} is bound to {driver or 'no driver'}, not {VFIO_DRIVER}; bind it "
                             "to vfio-pci or ask for rebind: true", field=FIELD)
    if needs_rebind and not fs.driver_dir(VFIO_DRIVER).is_dir():
        raise Unsupported(f"{FIELD}: the {VFIO_DRIVER} driver is not loaded (modprobe vfio-pci)", field=FIELD)
    return VfioDevice(address, group, driver, members, needs_rebind)


def bind_vfio(host: str, *, sysfs: Sysfs | Path = Path("/sys")) -> str | None:
    """Bind PCI function ``host`` to ``vfio-pci`` through ``driver_override``; return its original driver.

    Already on ``vfio-pci``: nothing is done and ``vfio-pci`` is returned. On failure the original driver is
    restored before raising.

    Raises:
        InvalidRequest, NotFound: As for :func:`check_vfio`.
        Unsupported: ``vfio-pci`` is not loaded, or the kernel did not bind the device to it.
        QmpnetError: A sysfs write failed.
    """
    fs = _sysfs(sysfs)
    address = _existing(host, fs)
    original = fs.driver(address)
    if original == VFIO_DRIVER:
        return original
    if not fs.driver_dir(VFIO_DRIVER).is_dir():
        raise Unsupported(f"{FIELD}: the {VFIO_DRIVER} driver is not loaded (modprobe vfio-pci)", field=FIELD)
    try:
        _write(fs, fs.device(address) / "driver_override", VFIO_DRIVER)
        if original is not None:
            _write(fs, fs.driver_dir(original) / "unbind", address)
        _write(fs, fs.root / "bus/pci/drivers_probe", address)
        _expect_driver(fs, address, VFIO_DRIVER)
    except BaseException:
        _restore_quietly(fs, address, original)
        raise
    log.info("bound %s to %s (was %s)", address, VFIO_DRIVER, original or "unbound")
    return original


def restore_driver(host: str, original: str | None, *, sysfs: Sysfs | Path = Path("/sys")) -> None:
    """Give PCI function ``host`` back to ``original`` (``None``: leave it unbound) after :func:`bind_vfio`.

    Raises:
        InvalidRequest, NotFound: As for :func:`check_vfio`.
        QmpnetError: A sysfs write failed, or the device did not return to ``original``.
    """
    fs = _sysfs(sysfs)
    address = _existing(host, fs)
    if original == VFIO_DRIVER:
        return
    _write(fs, fs.device(address) / "driver_override", "\n")
    current = fs.driver(address)
    if current is not None and current != original:
        _write(fs, fs.driver_dir(current) / "unbind", address)
    if original is not None and fs.driver(address) != original:
        _write(fs, fs.root / "bus/pci/drivers_probe", address)
        if fs.driver(address) != original and (fs.driver_dir(original) / "bind").exists():
            _write(fs, fs.driver_dir(original) / "bind", address)
        if fs.driver(address) != original:
            raise QmpnetError(f"{FIELD}: {address} did not return to driver {original}", field=FIELD)
    log.info("returned %s to %s", address, original or "no driver")


def _expect_driver(fs: Sysfs, address: str, driver: str) -> None:
    bound = fs.driver(address)
    if bound != driver:
        raise Unsupported(f"{FIELD}: {address} did not bind to {driver} (now: {bound or 'no driver'})", field=FIELD)


def _sysfs(sysfs: Sysfs | Path) -> Sysfs:
    return sysfs if isinstance(sysfs, Sysfs) else Sysfs(sysfs)


def _existing(host: str, fs: Sysfs) -> str:
    address = parse_pci_host(host)
    if not fs.device(address).is_dir():
        raise NotFound(f"{FIELD}: no PCI function {address} on this host", field=FIELD)
    return address


def _viable(member: GroupMember) -> bool:
    return member.driver is None or member.driver in _VIABLE_DRIVERS or member.pci_class >> 8 == _BRIDGE_SUBCLASS


def _link_name(path: Path) -> str | None:
    try:
        return path.readlink().name
    except FileNotFoundError:
        return None


def _write(fs: Sysfs, path: Path, text: str) -> None:
    try:
        fs.write(path, text)
    except OSError as err:
        raise QmpnetError(f"{FIELD}: writing {text.strip()!r} to {path} failed: {err.strerror}", field=FIELD) from err


def _restore_quietly(fs: Sysfs, address: str, original: str | None) -> None:
    try:
        restore_driver(address, original, sysfs=fs)
    except QmpnetError as err:
        log.warning("could not give %s back to %s: %s", address, original or "no driver", err)
