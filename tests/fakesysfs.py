"""A fake sysfs for the VFIO tests (unit and integration): a tree laid out like the kernel's, and a kernel behind it.

:class:`FakeTree` builds the parts of sysfs qmpnet reads (PCI devices with their class, driver, driver_override
and IOMMU group links; drivers; groups) under a directory of the test's; :class:`FakeKernel` is a
:class:`~qmpnet.adapters.hostnet.Sysfs` whose writes act as the kernel's would (unbind, probe honouring
``driver_override``, bind), so the bind and restore paths can run to their end without a real IOMMU. Importable from
both trees because pytest puts ``tests/`` on the path (``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpnet.adapters.hostnet.vfio import Sysfs

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["FakeKernel", "FakeTree"]


class FakeTree:
    """A sysfs tree laid out like the kernel's: devices, drivers, IOMMU groups and their symlinks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "bus/pci/devices").mkdir(parents=True)
        (root / "bus/pci/drivers").mkdir(parents=True)
        (root / "bus/pci/drivers_probe").write_text("")
        self.default_driver: dict[str, str | None] = {}

    def add_driver(self, name: str) -> None:
        path = self.root / "bus/pci/drivers" / name
        path.mkdir(exist_ok=True)
        for attr in ("bind", "unbind", "new_id"):
            (path / attr).write_text("")

    def add_device(self, address: str, pci_class: int, driver: str | None, group: str | None) -> None:
        real = self.root / "devices/pci0000:00" / address
        real.mkdir(parents=True)
        (real / "class").write_text(f"{pci_class:#08x}\n")
        (real / "driver_override").write_text("(null)\n")
        (self.root / "bus/pci/devices" / address).symlink_to(f"../../../devices/pci0000:00/{address}")
        self.default_driver[address] = driver
        if driver is not None:
            self.bind(address, driver)
        if group is not None:
            members = self.root / "kernel/iommu_groups" / group / "devices"
            members.mkdir(parents=True, exist_ok=True)
            (real / "iommu_group").symlink_to(f"../../../kernel/iommu_groups/{group}")
            (members / address).symlink_to(f"../../../../devices/pci0000:00/{address}")

    def bind(self, address: str, driver: str) -> None:
        self.add_driver(driver)
        self.device(address).joinpath("driver").symlink_to(f"../../../bus/pci/drivers/{driver}")

    def unbind(self, address: str) -> None:
        self.device(address).joinpath("driver").unlink()

    def device(self, address: str) -> Path:
        return self.root / "devices/pci0000:00" / address

    def driver(self, address: str) -> str | None:
        link = self.device(address) / "driver"
        return link.readlink().name if link.is_symlink() else None

    def override(self, address: str) -> str:
        return (self.device(address) / "driver_override").read_text().strip()


class FakeKernel(Sysfs):
    """A :class:`Sysfs` whose writes do what the kernel's would: unbind, probe (honouring driver_override), bind."""

    def __init__(self, tree: FakeTree, *, vfio_refuses: bool = False) -> None:
        super().__init__(tree.root)
        self.tree = tree
        self.writes: list[tuple[str, str]] = []
        self.vfio_refuses = vfio_refuses

    def write(self, path: Path, text: str) -> None:
        rel = str(path.relative_to(self.root))
        self.writes.append((rel, text))
        if rel.endswith("/driver_override"):
            (self.tree.device(path.parent.name) / "driver_override").write_text(text.strip() or "(null)")
        elif rel.endswith("/unbind"):
            assert self.tree.driver(text) == path.parent.name, "unbind from a driver the device is not on"
            self.tree.unbind(text)
        elif rel == "bus/pci/drivers_probe":
            if self.tree.driver(text) is None:
                override = self.tree.device(text).joinpath("driver_override").read_text().strip()
                wanted = override if override != "(null)" else self.tree.default_driver[text]
                if wanted is not None and not (wanted == "vfio-pci" and self.vfio_refuses):
                    self.tree.bind(text, wanted)
        elif rel.endswith("/bind"):
            self.tree.bind(text, path.parent.name)
        else:
            raise AssertionError(f"unexpected sysfs write to {rel}")
