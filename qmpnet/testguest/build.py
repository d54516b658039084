"""Build and cache the test guest: an uncompressed kernel and a tiny initramfs.

Design decisions:

- **Debian's own packages, fetched with apt.** A fresh CI machine only needs `apt-get install qemu-system-x86
  busybox-static`; everything else is downloaded with `apt-get download` (no root needed unless the package lists
  are missing and `apt-get update` must run). The kernel is the generic `linux-image-<abi>-amd64` that
  `linux-image-amd64` points at: the `-cloud` flavour lacks the e1000, e1000e and rtl8139 drivers.
- **Boot `vmlinux`, not `vmlinuz`.** QEMU boots an uncompressed ELF kernel through its PVH entry point, which
  skips SeaBIOS' real-mode loader and the in-guest decompression: about 3.5 s to userspace under TCG instead of
  about 8 s. The ELF is the xz payload of the bzImage, decompressed here once.
- **Only the NIC drivers (and 802.1Q VLANs) are modules we need**; everything else the tests rely on (PCI
  hot-plug, MSI, serial, devtmpfs, AF_PACKET for udhcpc) is built in. Dependencies come from each module's
  `.modinfo` section, so no `depmod`/`modinfo` binary is needed on the host.
- **Pure-Python initramfs**: a gzip'd newc cpio written by :class:`CpioWriter`, so no `cpio` binary either.
- **A content-addressed cache.** The cache directory name holds the kernel package version, the busybox version
  and a digest of everything else that shapes the image (init.sh, the module list, :data:`FORMAT_VERSION`). An
  existing directory is trusted as is: it is only ever created by renaming a complete staging directory, so a
  crash leaves at worst an orphaned `.build-*` directory, never a half image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

#: Bump when the layout of the image changes in a way the other key parts do not capture.
FORMAT_VERSION = 1

#: The NIC drivers the guest loads at boot, in this order; their dependencies are loaded before them.
#: QEMU's rtl8139 binds to 8139cp (8139too declines it), but 8139too costs nothing and covers older models.
NIC_MODULES: tuple[str, ...] = ("virtio_net", "virtio_pci", "e1000", "e1000e", "8139cp", "8139too")
#: What the busybox guest loads after them: 8021q (with garp, mrp, stp, llc) lets a guest on a VLAN trunk make
#: ``eth1.10`` (``ip link add ... type vlan``). The Debian guest has every module of its kernel on its disk.
BUSYBOX_MODULES: tuple[str, ...] = (*NIC_MODULES, "8021q")

#: insmod parameters. e1000e misses link-change interrupts in MSI-X mode on this kernel: use legacy interrupts.
MODULE_PARAMETERS: Mapping[str, str] = {"e1000e": "IntMode=0"}

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.gz"
MANIFEST_FILE = "manifest.json"

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3
#: linux-image-6.1.0-56-amd64 or linux-image-6.12.48+deb13-amd64, but not a flavour such as -cloud-amd64.
_GENERIC_KERNEL = re.compile(r"^linux-image-\d[\w.+~]*(?:-\d+)?-amd64$")
_DEPENDENCY = re.compile(r"^(?P<name>[\w.+-]+)(?:\s*\(=\s*(?P<version>[^)\s]+)\))?")


class BuildError(RuntimeError):
    """The test guest image could not be built (a tool failed, a package or file was missing)."""


@dataclass(frozen=True)
class GuestImage:
    """A built test guest: what QEMU's `-kernel` and `-initrd` need."""

    kernel: Path
    initrd: Path


@dataclass(frozen=True)
class Package:
    """A Debian binary package at a given version, and whether that version is the one installed here."""

    name: str
    version: str
    installed: bool = False


@dataclass(frozen=True)
class KernelModule:
    """A kernel module file and the modules it depends on."""

    name: str
    path: Path
    depends: tuple[str, ...]


def default_cache_dir() -> Path:
    """Return `$QMPNET_TESTGUEST_CACHE`, else `~/.cache/qmpnet/testguest`."""
    configured = os.environ.get("QMPNET_TESTGUEST_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "qmpnet" / "testguest"


def ensure_image(cache_dir: Path | None = None, progress: Callable[[str], None] | None = None) -> GuestImage:
    """Return the cached test guest image, building it first if this version is not cached yet.

    Args:
        cache_dir: Where images are kept; :func:`default_cache_dir` when None.
        progress: Called with a short human-readable line at each slow step.

    Returns:
        The paths of the kernel and the initramfs.

    Raises:
        BuildError: A package could not be resolved or downloaded, or the kernel had an unexpected layout.
    """
    inputs = build_inputs(cache_dir, progress or logger.info)
    target = inputs.cache / cache_key(inputs.kernel, inputs.busybox)
    if not _is_complete(target):
        inputs.say(f"building the test guest into {target}")
        build_into(target, ".build-", lambda image_dir, work: _build(image_dir, work, inputs), _is_complete)
    return GuestImage(kernel=target / KERNEL_FILE, initrd=target / INITRD_FILE)


def init_script() -> bytes:
    """Return the guest's /init (init.sh, shipped as package data)."""
    return resources.files(__package__ or "qmpnet.testguest").joinpath("init.sh").read_bytes()


def cache_key(kernel: Package, busybox: Package) -> str:
    """Return the cache directory name for an image built from these packages and the current sources."""
    digest = hashlib.sha256()
    digest.update(f"format={FORMAT_VERSION}\n".encode())
    digest.update(json.dumps([BUSYBOX_MODULES, dict(MODULE_PARAMETERS)]).encode())
    digest.update(init_script())
    parts = (safe_name(f"linux-{kernel.version}"), safe_name(f"busybox-{busybox.version}"), digest.hexdigest()[:12])
    return "_".join(parts)


def safe_name(text: str) -> str:
    """``text`` with everything but ``[A-Za-z0-9.+-]`` replaced by ``-`` (for cache directory names)."""
    return re.sub(r"[^A-Za-z0-9.+-]", "-", text)


def _is_complete(directory: Path) -> bool:
    return (directory / KERNEL_FILE).is_file() and (directory / INITRD_FILE).is_file()


@dataclass(frozen=True)
class BuildInputs:
    """What every image build starts from: the cache directory, the progress sink, the kernel and busybox."""

    cache: Path
    say: Callable[[str], None]
    kernel: Package
    busybox: Package


def build_inputs(cache_dir: Path | None, say: Callable[[str], None]) -> BuildInputs:
    """Resolve the cache directory (:func:`default_cache_dir` when None) and the kernel and busybox packages.

    Raises:
        BuildError: apt cannot resolve the kernel or busybox package.
    """
    cache = (cache_dir if cache_dir is not None else default_cache_dir()).absolute()
    return BuildInputs(cache, say, resolve_kernel_package(say), resolve_busybox_package())


def build_into(
    target: Path, prefix: str, build: Callable[[Path, Path], None], is_complete: Callable[[Path], bool]
) -> None:
    """Build an image with ``build(image_dir, work)`` in a staging directory and move it to ``target`` in one rename.

    The staging directory (named ``prefix...``) sits beside ``target`` and is removed whatever happens; a
    concurrent builder that won the race to ``target`` is fine when ``is_complete(target)``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=prefix) as staging:
        image_dir = Path(staging) / "image"
        image_dir.mkdir()
        build(image_dir, Path(staging) / "work")
        try:
            image_dir.rename(target)
        except OSError:
            if not is_complete(target):
                raise


# --- packages ------------------------------------------------------------------------------------------------


def run_tool(args: Sequence[str], cwd: Path | None = None) -> str:
    """Run a command and return its stdout; raise :class:`BuildError` with its stderr when it fails."""
    try:
        done = subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise BuildError(f"{args[0]} is not installed: {err}") from err
    except subprocess.CalledProcessError as err:
        raise BuildError(f"{' '.join(args)} failed with rc {err.returncode}: {err.stderr.strip()}") from err
    return done.stdout


def resolve_kernel_package(progress: Callable[[str], None]) -> Package:
    """Return the generic kernel package `linux-image-amd64` currently depends on.

    Runs `apt-get update` once if the package lists do not know `linux-image-amd64` yet.

    Raises:
        BuildError: apt cannot resolve the kernel package.
    """
    try:
        return _resolve_kernel_package()
    except BuildError as err:
        progress(f"apt cannot resolve {KERNEL_META_PACKAGE} ({err}); running apt-get update")
    run_tool(["apt-get", "update"])
    return _resolve_kernel_package()


def _resolve_kernel_package() -> Package:
    # One apt-cache call (they are slow: about a second each) gives both the name and the pinned version:
    # "Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)".
    fields = run_tool(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE])
    depends = next((line for line in fields.splitlines() if line.startswith("Depends:")), "")
    for dependency in depends.removeprefix("Depends:").split(","):
        match = _DEPENDENCY.match(dependency.strip())
        if match and _GENERIC_KERNEL.match(match["name"]):
            return Package(match["name"], match["version"] or _candidate_version(match["name"]))
    raise BuildError(f"no linux-image-<abi>-amd64 among the dependencies of {KERNEL_META_PACKAGE}: {depends!r}")


def _candidate_version(package: str) -> str:
    for line in run_tool(["apt-cache", "show", "--no-all-versions", package]).splitlines():
        if line.startswith("Version:"):
            return line.partition(":")[2].strip()
    raise BuildError(f"apt-cache show {package} gave no version")


def resolve_busybox_package() -> Package:
    """Return the busybox-static package to use: the installed one, else apt's candidate.

    Raises:
        BuildError: busybox-static is neither installed nor known to apt.
    """
    try:
        status = run_tool(["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", BUSYBOX_PACKAGE])
    except BuildError:
        status = ""
    state, _, version = status.partition(" ")
    if state == "installed" and version:
        return Package(BUSYBOX_PACKAGE, version, installed=True)
    return Package(BUSYBOX_PACKAGE, _candidate_version(BUSYBOX_PACKAGE))


def download_and_unpack(package: Package, work: Path) -> Path:
    """Download a package with apt and unpack it; return the root of the unpacked tree.

    Raises:
        BuildError: apt-get or dpkg-deb failed.
    """
    work.mkdir(parents=True, exist_ok=True)
    # As root, apt drops to the _apt user for downloads, which cannot write into a private directory.
    sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
    run_tool(["apt-get", "download", *sandbox, f"{package.name}={package.version}"], cwd=work)
    (deb,) = work.glob(f"{package.name}_*.deb")
    root = work / package.name
    run_tool(["dpkg-deb", "-x", str(deb), str(root)])
    deb.unlink()
    return root


def static_busybox(package: Package, work: Path) -> bytes:
    """Return the static busybox binary: /bin/busybox if busybox-static is installed, else from its package.

    Raises:
        BuildError: the binary is not static (a dynamic busybox cannot run in the initramfs).
    """
    installed = Path("/bin/busybox")
    if package.installed and installed.is_file():
        binary = installed.read_bytes()
    else:
        binary = (download_and_unpack(package, work) / "bin" / "busybox").read_bytes()
    if not binary.startswith(_ELF_MAGIC) or _elf_has_interpreter(binary):
        raise BuildError("busybox is not a static ELF binary; install busybox-static")
    return binary


# --- kernel --------------------------------------------------------------------------------------------------


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the uncompressed ELF kernel inside an xz-compressed bzImage.

    Raises:
        BuildError: no xz stream in the image decompresses to an ELF file.
    """
    start = bzimage.find(_XZ_MAGIC)
    while start >= 0:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            # The decompressor stops at the end of the stream; what follows it is simply left unused.
            payload = decompressor.decompress(bzimage[start:])
        except lzma.LZMAError:
            payload = b""
        if decompressor.eof and payload.startswith(_ELF_MAGIC):
            return payload
        start = bzimage.find(_XZ_MAGIC, start + 1)
    raise BuildError("the kernel image holds no xz-compressed ELF payload")


def _elf_sections(elf: bytes) -> dict[str, bytes]:
    """Return the sections of a 64-bit little-endian ELF file by name."""
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<I20xQQ", elf, shoff + index * shentsize) for index in range(shnum)]
    _, names_offset, _ = headers[shstrndx]
    sections: dict[str, bytes] = {}
    for name_offset, offset, size in headers:
        start = names_offset + name_offset
        name = elf[start : elf.index(b"\0", start)].decode()
        sections[name] = elf[offset : offset + size]
    return sections


def _elf_has_interpreter(elf: bytes) -> bool:
    """Whether a 64-bit ELF executable asks for a dynamic loader (PT_INTERP)."""
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == _PT_INTERP for i in range(phnum))


def read_module(path: Path) -> KernelModule:
    """Read a module's name and dependencies from its `.modinfo` section."""
    info: dict[str, str] = {}
    for entry in _elf_sections(path.read_bytes()).get(".modinfo", b"").split(b"\0"):
        key, _, value = entry.decode(errors="replace").partition("=")
        info.setdefault(key, value)
    name = info.get("name") or path.stem.replace("-", "_")
    depends = tuple(dep for dep in info.get("depends", "").split(",") if dep)
    return KernelModule(name=name, path=path, depends=depends)


def order_modules(wanted: Iterable[str], lookup: Callable[[str], KernelModule | None]) -> list[KernelModule]:
    """Return the wanted modules and their dependencies, each after everything it depends on.

    Args:
        wanted: Module names in the preferred load order.
        lookup: Returns a module by name, or None when it is built into the kernel.
    """
    ordered: dict[str, KernelModule] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name in chain:
            raise BuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        module = lookup(name)
        if module is None:
            return
        for dependency in module.depends:
            visit(dependency, (*chain, name))
        ordered[name] = module

    for name in wanted:
        visit(name, ())
    return list(ordered.values())


def module_lookup(module_dir: Path) -> Callable[[str], KernelModule | None]:
    """A lookup for :func:`order_modules` over an unpacked kernel's module directory."""
    files = {path.stem.replace("-", "_"): path for path in (module_dir / "kernel").rglob("*.ko")}
    builtin_list = (module_dir / "modules.builtin").read_text().split()
    builtin = {Path(entry).stem.replace("-", "_") for entry in builtin_list}

    def lookup(name: str) -> KernelModule | None:
        if name in files:
            return read_module(files[name])
        if name in builtin:
            return None
        raise BuildError(f"kernel module {name} is neither in {module_dir} nor built in")

    return lookup


# --- initramfs -----------------------------------------------------------------------------------------------


class CpioWriter:
    """Writes a newc ("070701") cpio archive, the format the kernel unpacks into its initramfs."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._inode = 0

    def directory(self, path: str, mode: int = 0o755) -> None:
        """Add a directory."""
        self._entry(path, 0o040000 | mode, nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file."""
        self._entry(path, 0o100000 | mode, data=data)

    def symlink(self, path: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(path, 0o120777, data=target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node."""
        self._entry(path, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        """Add the trailer and return the archive."""
        self._entry("TRAILER!!!", 0)
        return self._buffer.getvalue()

    def _entry(self, path: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        self._inode += 1
        name = path.encode() + b"\0"
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = (self._inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
        self._write(b"070701" + b"".join(b"%08x" % value for value in fields) + name)
        self._write(data)

    def _write(self, chunk: bytes) -> None:
        """Write a header or file body, padded to a multiple of four bytes as newc requires."""
        self._buffer.write(chunk)
        self._buffer.write(b"\0" * (-self._buffer.tell() % 4))


#: The busybox guest's directories; the Debian guest's initramfs has its own (it switches to a root disk).
GUEST_DIRECTORIES = ("bin", "dev", "etc", "etc/testguest", "lib", "lib/modules", "proc", "run", "sys", "tmp")


def build_initramfs(
    busybox: bytes,
    modules: Sequence[KernelModule],
    *,
    directories: Sequence[str] = GUEST_DIRECTORIES,
    init: bytes | None = None,
    load_list: str = "etc/testguest/modules",
) -> bytes:
    """Return the gzip'd initramfs: busybox, the modules, their load list and ``init`` (the busybox guest's).

    The load list (at ``load_list``) has a line per module, in load order: its name and its insmod parameters.
    """
    cpio = CpioWriter()
    for directory in directories:
        cpio.directory(directory)
    # The kernel opens /dev/console for /init before devtmpfs is mounted.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox, mode=0o755)
    cpio.symlink("bin/sh", "busybox")
    lines = "".join(f"{m.name} {MODULE_PARAMETERS.get(m.name, '')}".rstrip() + "\n" for m in modules)
    cpio.file(load_list, lines.encode())
    for module in modules:
        cpio.file(f"lib/modules/{module.name}.ko", module.path.read_bytes())
    cpio.file("init", init_script() if init is None else init, mode=0o755)
    return gzip.compress(cpio.finish(), mtime=0)


def unpack_kernel(kernel: Package, work: Path, image_dir: Path, say: Callable[[str], None]) -> tuple[Path, str]:
    """Unpack ``kernel`` below ``work`` and write its ``vmlinux`` into ``image_dir``.

    Returns:
        The unpacked kernel's module directory and its release (``6.1.0-56-amd64``).

    Raises:
        BuildError: apt-get or dpkg-deb failed, or the package has no bzImage or no modules directory.
    """
    say(f"downloading and unpacking {kernel.name} {kernel.version}")
    root = download_and_unpack(kernel, work)
    release = kernel.name.removeprefix("linux-image-")
    say("extracting vmlinux from the bzImage")
    (image_dir / KERNEL_FILE).write_bytes(extract_vmlinux((root / "boot" / f"vmlinuz-{release}").read_bytes()))
    candidates = (root / "lib/modules" / release, root / "usr/lib/modules" / release)
    module_dir = next((d for d in candidates if d.is_dir()), None)
    if module_dir is None:
        raise BuildError(f"{kernel.name} has no modules directory for {release}")
    return module_dir, release


def _build(image_dir: Path, work: Path, inputs: BuildInputs) -> None:
    kernel, busybox, say = inputs.kernel, inputs.busybox, inputs.say
    module_dir, _ = unpack_kernel(kernel, work, image_dir, say)
    modules = order_modules(BUSYBOX_MODULES, module_lookup(module_dir))
    say(f"writing the initramfs ({len(modules)} modules: {' '.join(m.name for m in modules)})")
    (image_dir / INITRD_FILE).write_bytes(build_initramfs(static_busybox(busybox, work), modules))
    manifest = {
        "format": FORMAT_VERSION,
        "kernel": {"package": kernel.name, "version": kernel.version},
        "busybox": {"package": busybox.name, "version": busybox.version},
        "modules": [{"name": m.name, "parameters": MODULE_PARAMETERS.get(m.name, "")} for m in modules],
    }
    (image_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
