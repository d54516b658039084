"""Build and cache the lab host's image: Debian's generic kernel with all of its modules, and a tiny initramfs.

The lab host (:mod:`.lab`) boots this kernel with the host's own root file system as its userland, so the image
holds no distribution: the kernel (uncompressed ``vmlinux``, as for the test guests), an initramfs with busybox,
the handful of modules needed to reach the host's files (virtio, 9p, overlay, virtio-net for the agent) and
``lab-init.sh``, and the kernel's complete module tree with ``modules.dep`` (``depmod`` from kmod), which the lab
mounts at ``/usr/lib/modules/<release>``.

It reuses the test guest's machinery (:mod:`.build`): the kernel package ``linux-image-amd64`` points at, fetched
with ``apt-get download``, and a content-addressed cache directory created by renaming a complete staging
directory. Building needs no root; it takes about half a minute (download, unpacking, depmod).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from . import build

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

logger = logging.getLogger(__name__)

#: Bump when the image changes in a way the other key parts do not capture.
LAB_FORMAT_VERSION = 1
#: Loaded by the initramfs, in this order (with their dependencies first).
INITRAMFS_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay")
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.gz"
MODULES_DIR = "modules"
MANIFEST_FILE = "manifest.json"
INIT_SCRIPT = "lab-init.sh"


@dataclass(frozen=True)
class LabImage:
    """A built lab image: kernel, initramfs, and the kernel's module tree for ``release``."""

    kernel: Path
    initrd: Path
    modules: Path
    release: str


def init_script() -> bytes:
    """The initramfs's /init (lab-init.sh, shipped as package data)."""
    return resources.files(__package__ or "qmpnet.testguest").joinpath(INIT_SCRIPT).read_bytes()


def lab_cache_key(kernel: build.Package, busybox: build.Package) -> str:
    """The cache directory name for a lab image built from these packages and the current sources."""
    digest = hashlib.sha256()
    digest.update(f"format={LAB_FORMAT_VERSION}\nbusybox={busybox.version}\n".encode())
    digest.update(json.dumps(INITRAMFS_MODULES).encode())
    digest.update(init_script())
    return "_".join(("lab", build.safe_name(f"linux-{kernel.version}"), digest.hexdigest()[:12]))


def _image(directory: Path, release: str) -> LabImage:
    return LabImage(
        kernel=directory / KERNEL_FILE,
        initrd=directory / INITRD_FILE,
        modules=directory / MODULES_DIR / "lib" / "modules" / release,
        release=release,
    )


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in (KERNEL_FILE, INITRD_FILE, MANIFEST_FILE))


def ensure_lab_image(cache_dir: Path | None = None, progress: Callable[[str], None] | None = None) -> LabImage:
    """Return the cached lab image, building it first when this version is not cached yet.

    Args:
        cache_dir: Where images are kept; :func:`~qmpnet.testguest.build.default_cache_dir` when None.
        progress: Called with a short line at each slow step.

    Raises:
        build.BuildError: apt cannot resolve or download the kernel, or depmod (kmod) is missing.
    """
    inputs = build.build_inputs(cache_dir, progress or logger.info)
    target = inputs.cache / lab_cache_key(inputs.kernel, inputs.busybox)
    if not _is_complete(target):
        if shutil.which("depmod") is None:
            raise build.BuildError(
                "depmod is not installed (apt-get install kmod): the lab needs the kernel's modules.dep"
            )
        inputs.say(f"building the lab image into {target}")
        build.build_into(target, ".build-lab-", lambda image_dir, work: _build(image_dir, work, inputs), _is_complete)
    release = json.loads((target / MANIFEST_FILE).read_text())["release"]
    return _image(target, str(release))


def _build(image_dir: Path, work: Path, inputs: build.BuildInputs) -> None:
    kernel, say = inputs.kernel, inputs.say
    module_dir, release = build.unpack_kernel(kernel, work, image_dir, say)
    modules = build.order_modules(INITRAMFS_MODULES, build.module_lookup(module_dir))
    say(f"writing the initramfs ({' '.join(m.name for m in modules)})")
    (image_dir / INITRD_FILE).write_bytes(_initramfs(build.static_busybox(inputs.busybox, work / "busybox"), modules))
    say("moving the module tree into the image and running depmod")
    tree = image_dir / MODULES_DIR / "lib" / "modules"
    tree.mkdir(parents=True)
    shutil.move(module_dir, tree / release)
    build.run_tool(["depmod", "--basedir", str(image_dir / MODULES_DIR), release])
    count = sum(1 for _ in (tree / release).rglob("*.ko"))
    manifest = {
        "format": LAB_FORMAT_VERSION,
        "kernel": {"package": kernel.name, "version": kernel.version},
        "release": release,
        "modules": count,
        "initramfs_modules": [m.name for m in modules],
    }
    (image_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def _initramfs(busybox: bytes, modules: Sequence[build.KernelModule]) -> bytes:
    directories = ("bin", "dev", "etc", "etc/lab", "lib", "lib/modules", "proc", "sys")
    return build.build_initramfs(
        busybox, modules, directories=directories, init=init_script(), load_list="etc/lab/modules"
    )
