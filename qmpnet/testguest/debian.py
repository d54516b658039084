"""Build and cache the Debian 12 test guest: a real distribution with systemd, udev, networkd and the guest agent.

The busybox guest (:mod:`.build`) is what the fast tests use; this one is what users run: systemd, udev's
predictable interface names (``ens4``, ``enp1s0``), systemd-networkd doing DHCP on every ``en*``/``eth*``
interface, and Debian's qemu-guest-agent on a virtio-serial port, so qmpnet's guest-agent client and verified
hot-plug are tested against the real thing.

Design decisions:

- **Debian's packages only.** `debootstrap --variant=minbase` from the mirror this machine's apt already uses,
  plus systemd, udev, kmod, iproute2 and qemu-guest-agent. Building needs root (debootstrap, chroot) and
  takes about a minute; it happens once per cache key.
- **The busybox guest's kernel**, booted the same way (uncompressed ``vmlinux`` through PVH). Only the modules the
  guest needs go into the root file system (NIC drivers, virtio-blk/-serial, ext4), with `depmod` run in the
  chroot so udev loads them by modalias; fewer modules also means a faster boot under TCG.
- **A tiny initramfs** (busybox, virtio-blk and ext4) mounts ``/dev/vda`` and hands over to systemd; no
  initramfs-tools run in the chroot. QEMU opens the root image with ``snapshot=on``, so the cached image is never
  written and guests can share it.
- **Boot time is spent on nothing but the network**: apt and fstrim timers, the tty1 getty, first-boot wizards and
  ``systemd-networkd-wait-online`` are masked; the journal stays in memory.
- **A content-addressed cache**, like the busybox guest: the key holds the kernel package version and a digest of
  the candidate versions of the packages installed, the suite, the files written into the image and
  :data:`DEBIAN_FORMAT_VERSION`. A key is a directory created by renaming a complete staging directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .build import (
    MODULE_PARAMETERS,
    NIC_MODULES,
    BuildError,
    BuildInputs,
    GuestImage,
    KernelModule,
    Package,
    build_initramfs,
    build_inputs,
    build_into,
    module_lookup,
    order_modules,
    run_tool,
    safe_name,
    static_busybox,
    unpack_kernel,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

logger = logging.getLogger(__name__)

#: Bump when the image changes in a way the other key parts do not capture.
DEBIAN_FORMAT_VERSION = 1
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES: tuple[str, ...] = ("systemd", "systemd-sysv", "udev", "kmod", "iproute2", "qemu-guest-agent")
#: Loaded by the initramfs to reach the root file system. ext4 asks the crypto API for crc32c at mount time (a
#: soft dependency that `.modinfo` does not list), so its generic implementation goes in explicitly.
BOOT_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
#: In the root file system for udev: the NIC drivers, the agent's virtio-serial port, and the boot modules.
GUEST_MODULES: tuple[str, ...] = (*NIC_MODULES, "virtio_console", *BOOT_MODULES)
ENABLED_UNITS: tuple[str, ...] = ("systemd-networkd.service",)
MASKED_UNITS: tuple[str, ...] = (
    "systemd-networkd-wait-online.service",
    "systemd-firstboot.service",
    "getty@tty1.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-pstore.service",
)
HOSTNAME = "qmpnet-debian"
ROOTFS_FILE = "rootfs.ext4"
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.gz"
MANIFEST_FILE = "manifest.json"
_EXTRA_MIB = 160
_DATA_FILES = ("debian-init.sh", "debian-dhcp.network")


@dataclass(frozen=True)
class DebianImage(GuestImage):
    """A built Debian guest: kernel and initramfs as for the busybox guest, plus the root file system image."""

    rootfs: Path


def data_file(name: str) -> bytes:
    """A file shipped beside this module (the initramfs /init, the networkd configuration)."""
    return resources.files(__package__ or "qmpnet.testguest").joinpath(name).read_bytes()


def candidate_versions(packages: Sequence[str]) -> dict[str, str]:
    """The versions apt would install of ``packages`` (one ``apt-cache policy`` call).

    Raises:
        BuildError: apt knows no candidate for one of them.
    """
    versions: dict[str, str] = {}
    current: str | None = None
    for line in run_tool(["apt-cache", "policy", *packages]).splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif current is not None and line.strip().startswith("Candidate:"):
            versions[current] = line.partition(":")[2].strip()
    missing = [p for p in packages if versions.get(p, "(none)") == "(none)"]
    if missing:
        raise BuildError(f"apt has no candidate for {', '.join(missing)}; run apt-get update")
    return versions


def apt_mirror(suite: str = DEBIAN_SUITE) -> str | None:
    """The mirror this machine's apt uses for ``suite`` main, or None (debootstrap's default mirror then)."""
    try:
        targets = run_tool(["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(COMPONENT)"])
    except BuildError:
        return None
    for line in targets.splitlines():
        uri, _, rest = line.partition(" ")
        if rest.split() == [suite, "main"]:
            return uri
    return None


def debian_cache_key(kernel: Package, busybox: Package, versions: Mapping[str, str]) -> str:
    """The cache directory name for a Debian image built from these packages and the current sources."""
    digest = hashlib.sha256()
    digest.update(f"format={DEBIAN_FORMAT_VERSION}\nsuite={DEBIAN_SUITE}\nbusybox={busybox.version}\n".encode())
    digest.update(json.dumps([sorted(versions.items()), GUEST_MODULES, BOOT_MODULES, dict(MODULE_PARAMETERS)]).encode())
    digest.update(json.dumps([ENABLED_UNITS, MASKED_UNITS, HOSTNAME]).encode())
    for name in _DATA_FILES:
        digest.update(data_file(name))
    return "_".join(("debian12", safe_name(f"linux-{kernel.version}"), digest.hexdigest()[:12]))


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in (KERNEL_FILE, INITRD_FILE, ROOTFS_FILE))


def _image(directory: Path) -> DebianImage:
    return DebianImage(kernel=directory / KERNEL_FILE, initrd=directory / INITRD_FILE, rootfs=directory / ROOTFS_FILE)


def ensure_debian_image(cache_dir: Path | None = None, progress: Callable[[str], None] | None = None) -> DebianImage:
    """Return the cached Debian guest image, building it first (about a minute, as root) when it is not cached.

    Args:
        cache_dir: Where images are kept; :func:`~qmpnet.testguest.build.default_cache_dir` when None.
        progress: Called with a short line at each slow step.

    Raises:
        BuildError: Not root, debootstrap missing or failing, or a package could not be resolved.
    """
    inputs = build_inputs(cache_dir, progress or logger.info)
    versions = candidate_versions(DEBIAN_PACKAGES)
    target = inputs.cache / debian_cache_key(inputs.kernel, inputs.busybox, versions)
    if _is_complete(target):
        return _image(target)
    if os.geteuid() != 0:
        raise BuildError("building the Debian test guest needs root (debootstrap and chroot)")
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed (apt-get install debootstrap)")
    inputs.say(f"building the Debian test guest into {target}")
    build_into(target, ".build-debian-", lambda image_dir, work: _build(image_dir, work, inputs), _is_complete)
    return _image(target)


def _build(image_dir: Path, work: Path, inputs: BuildInputs) -> None:
    try:
        _build_in(image_dir, work, inputs)
    finally:
        _unmount_below(work)


def _build_in(image_dir: Path, work: Path, inputs: BuildInputs) -> None:
    kernel, say = inputs.kernel, inputs.say
    root = work / "root"
    mirror = apt_mirror()
    say(f"debootstrap {DEBIAN_SUITE} (minbase + {' '.join(DEBIAN_PACKAGES)}) from {mirror or 'the default mirror'}")
    work.mkdir(parents=True)
    command = ["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}", DEBIAN_SUITE, str(root)]
    run_tool([*command, *([mirror] if mirror else [])])

    module_dir, abi = unpack_kernel(kernel, work / "kernel", image_dir, say)
    lookup = module_lookup(module_dir)
    guest_modules = order_modules(GUEST_MODULES, lookup)
    say(f"installing {len(guest_modules)} kernel modules and configuring systemd")
    _install_modules(root, module_dir, abi, guest_modules)
    _configure(root)

    boot_modules = order_modules(BOOT_MODULES, lookup)
    say(f"writing the initramfs ({' '.join(m.name for m in boot_modules)})")
    (image_dir / INITRD_FILE).write_bytes(_initramfs(static_busybox(inputs.busybox, work / "busybox"), boot_modules))

    installed = _installed_versions(root)
    say("writing the root file system image")
    _make_ext4(root, image_dir / ROOTFS_FILE)
    manifest = {
        "format": DEBIAN_FORMAT_VERSION,
        "suite": DEBIAN_SUITE,
        "mirror": mirror,
        "kernel": {"package": kernel.name, "version": kernel.version},
        "packages": installed,
        "modules": [m.name for m in guest_modules],
    }
    (image_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def _chroot(root: Path, *args: str) -> str:
    return run_tool(["chroot", str(root), *args])


def _install_modules(root: Path, module_dir: Path, abi: str, modules: Sequence[KernelModule]) -> None:
    target = root / "usr/lib/modules" / abi
    for module in modules:
        destination = target / module.path.relative_to(module_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(module.path, destination)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (module_dir / name).is_file():
            shutil.copyfile(module_dir / name, target / name)
    _chroot(root, "depmod", abi)
    options = "".join(f"options {name} {params}\n" for name, params in MODULE_PARAMETERS.items())
    (root / "etc/modprobe.d/qmpnet-testguest.conf").write_text(options)


def _configure(root: Path) -> None:
    network = root / "etc/systemd/network"
    network.mkdir(parents=True, exist_ok=True)
    (network / "80-qmpnet-dhcp.network").write_bytes(data_file("debian-dhcp.network"))
    (root / "etc/hostname").write_text(f"{HOSTNAME}\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n::1 localhost\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,noatime 0 0\n")
    # Empty: each boot gets its own id (the harness passes systemd.machine_id=), so DHCP client ids differ.
    (root / "etc/machine-id").write_text("")
    journald = root / "etc/systemd/journald.conf.d"
    journald.mkdir(parents=True, exist_ok=True)
    (journald / "qmpnet-testguest.conf").write_text("[Journal]\nStorage=volatile\n")
    _chroot(root, "passwd", "--delete", "root")
    _chroot(root, "systemctl", "enable", *ENABLED_UNITS)
    _chroot(root, "systemctl", "mask", *MASKED_UNITS)
    for leftovers in (root / "var/cache/apt/archives", root / "var/lib/apt/lists"):
        for entry in leftovers.glob("*"):
            if entry.is_file() and entry.name != "lock":
                entry.unlink()


def _installed_versions(root: Path) -> dict[str, str]:
    listing = _chroot(root, "dpkg-query", "-W", "-f=${Package} ${Version}\\n", *DEBIAN_PACKAGES)
    return dict(line.split(" ", 1) for line in listing.splitlines() if " " in line)


def _initramfs(busybox: bytes, modules: Sequence[KernelModule]) -> bytes:
    # The busybox guest's initramfs, with /newroot to switch to the root disk and the Debian /init.
    directories = ("bin", "dev", "etc", "etc/testguest", "lib", "lib/modules", "newroot", "proc", "sys")
    return build_initramfs(busybox, modules, directories=directories, init=data_file("debian-init.sh"))


def _make_ext4(root: Path, image: Path) -> None:
    used = sum(entry.lstat().st_size for entry in root.rglob("*"))
    size_mib = used // (1024 * 1024) * 5 // 4 + _EXTRA_MIB
    run_tool(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "qmpnet-root", "-d", str(root), str(image), f"{size_mib}M"])


def _unmount_below(directory: Path) -> None:
    """Unmount whatever a failed debootstrap left mounted in the staging tree, so it can be removed safely."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = f"{directory.resolve()}/"
    for line in reversed(mounts):
        point = line.split()[1] if len(line.split()) > 1 else ""
        if point.startswith(prefix):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
