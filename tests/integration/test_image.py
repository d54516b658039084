"""The container image: built from the Dockerfile by scripts/image, run with podman against this host's services.

The module builds the image once under a tag of its own (scripts/image: the base from the registry or a cached
debootstrap'd Debian 12, pip with the host's index and CA as build secrets) and removes that tag at the end; the
cached base stays. Every container is started with the options scripts/image found for this host (OCI runtime,
limits) and a label of this run, and is removed, also when a test fails; the end checks that none is left.

- ``qmpnet --version`` in the container is the version of this checkout;
- ``qmpnet nic list --qmp`` / ``nic add --qmp`` in the container act on a host QEMU through its bind-mounted socket
  (the host's own monitor shows the NIC the container added);
- ``qmpnet serve`` in the container (host network) answers a client's requests through the host's mosquitto, and
  a ``podman stop`` ends it cleanly (its retained status says ``offline``).

A build or run that cannot work on this host fails with what scripts/image or podman said (no skip): the reason
is the finding.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import needs
import pytest
from aux_qmp import aux_args, aux_monitor
from mqtt_fixtures import (
    FAST_ENV,
    MOSQUITTO_5,
    Mosquitto,
    Process,
    Qemu,
    client_settings,
    free_port,
    fresh_root,
    scratch,
    wait_retained,
)

import qmpnet
from qmpnet.client import Client

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [
    pytest.mark.integration,
    needs.root("run containers with rootful podman (bind-mounted QMP sockets, the host network)"),
    needs.tool("podman", "podman"),
]

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 900.0  # seconds: a first build on a fresh machine debootstraps the base too
RUN_TIMEOUT = 120.0


def _podman(*args: str, timeout: float = RUN_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr.strip()}")
    return done


class Image:
    """The image this module built, and how to start containers of it on this host."""

    def __init__(self, tag: str, base: str, run_options: list[str], label: str) -> None:
        self.tag = tag
        self.base = base
        self.run_options = run_options
        self.label = label

    def argv(self, *podman_run: str) -> list[str]:
        """``run`` with this host's options, the run's label, then ``podman_run`` (options, the image, command)."""
        return ["run", *self.run_options, "--label", self.label, *podman_run]

    def run(self, *args: str, mounts: tuple[Path, ...] = ()) -> str:
        """``podman run --rm`` the image with ``args`` (mounting each of ``mounts`` at its own path); its stdout."""
        volumes = [f"--volume={path}:{path}" for path in mounts]
        return _podman(*self.argv("--rm", "--network=none", *volumes, self.tag, *args)).stdout

    def left(self) -> list[str]:
        """Containers of this run still there (running or not)."""
        listed = _podman("ps", "--all", "--filter", f"label={self.label}", "--format", "{{.Names}}")
        return listed.stdout.split()


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    run = uuid.uuid4().hex[:10]
    tag = f"localhost/qmpnet-test:{run}"
    script = str(REPO / "scripts" / "image")
    started = time.monotonic()
    built = subprocess.run([script, "--tag", tag], capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    try:
        if built.returncode != 0:
            pytest.fail(f"scripts/image --tag {tag}: exit {built.returncode}\n{built.stderr[-3000:]}")
        elapsed = time.monotonic() - started
        size = int(_podman("image", "inspect", "--format", "{{.Size}}", tag).stdout)
        options = subprocess.run(
            [script, "--run-options"], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
        )
        if options.returncode != 0:
            pytest.fail(f"scripts/image --run-options: exit {options.returncode}\n{options.stderr}")
        built_image = Image(tag, _built_on(built.stderr, tag), options.stdout.split(), f"org.qmpnet.test={run}")
        print(  # noqa: T201
            f"\nimage: {tag} built by scripts/image in {elapsed:.0f} s on {built_image.base}, {size / 1e6:.0f} MB;"
            f" podman run {' '.join(built_image.run_options) or '(no options)'}"
        )
        yield built_image
        assert built_image.left() == []
    finally:
        _podman("rmi", "--force", tag, check=False)
    assert _podman("image", "exists", tag, check=False).returncode == 1


def _built_on(log: str, tag: str) -> str:
    """The base scripts/image says it built ``tag`` on (``image: building TAG on BASE with ...``)."""
    found = re.search(rf"^image: building {re.escape(tag)} on (\S+) ", log, re.MULTILINE)
    assert found, log
    return found[1]


def test_version_is_this_checkouts(image: Image) -> None:
    assert image.run("--version").strip() == f"qmpnet {qmpnet.__version__}"


def _host_ca_bundles() -> dict[int, set[str]]:
    """The CA bundles a build could have been given (pip's ``cert``, the usual variables, the system's), by size."""
    found: dict[int, set[str]] = {}
    names = [os.environ.get(var, "") for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")]
    pip = [sys.executable, "-m", "pip", "config", "list"]
    listing = subprocess.run(pip, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False).stdout
    names += [line.split("=", 1)[1].strip("'") for line in listing.splitlines() if line.split("=")[0].endswith(".cert")]
    for name in [*names, "/etc/ssl/certs/ca-certificates.crt"]:
        path = Path(name)
        if name and path.is_file():
            data = path.read_bytes()
            found.setdefault(len(data), set()).add(hashlib.sha256(data).hexdigest())
    return found


def test_the_builds_pip_settings_and_ca_are_in_no_layer(image: Image, tmp_path: Path) -> None:
    env = json.loads(_podman("image", "inspect", "--format", "{{json .Config.Env}}", image.tag).stdout) or []
    assert [var for var in env if var.startswith("PIP_")] == []
    bundles = _host_ca_bundles()
    assert bundles, "no host CA bundle to look for"
    archive = tmp_path / "image.tar"
    _podman("save", "--format", "docker-archive", "--output", str(archive), image.tag)
    leaked, layers = [], 0
    with tarfile.open(archive) as outer:
        for member in outer:
            if not member.name.endswith(".tar"):
                continue
            layers += 1
            layer = outer.extractfile(member)
            assert layer is not None
            with tarfile.open(fileobj=layer) as files:
                for entry in files:
                    name = entry.name.rsplit("/", 1)[-1]
                    if name in {"pip.conf", "pip-conf", "pip-ca"} and "/site-packages/" not in entry.name:
                        leaked.append(entry.name)
                    elif entry.isfile() and entry.size in bundles:
                        content = files.extractfile(entry)
                        assert content is not None
                        if hashlib.sha256(content.read()).hexdigest() in bundles[entry.size]:
                            leaked.append(entry.name)
    assert layers >= 2
    assert leaked == []


def _nics(listing: str) -> dict[str, str]:
    return {nic["id"]: nic["model"] for nic in json.loads(listing)["nics"]}


def test_direct_mode_on_a_host_qemus_bind_mounted_socket(image: Image) -> None:
    with scratch("qmpnet-image-") as work:
        cold = ["-netdev", "user,id=cold0", "-device", "e1000,netdev=cold0,id=cold0,mac=52:54:00:12:34:56"]
        qemu = Qemu(work / "vm1.qmp", extra=[*aux_args(work), *cold]).start()
        try:
            sock = str(qemu.qmp)
            listed = image.run("nic", "list", "--qmp", sock, "--json", mounts=(work,))
            assert _nics(listed) == {"cold0": "e1000"}
            on_host = subprocess.run(
                [sys.executable, "-m", "qmpnet", "nic", "list", "--qmp", sock, "--json"],
                capture_output=True, text=True, timeout=RUN_TIMEOUT, check=True,
            )  # fmt: skip
            assert json.loads(listed) == json.loads(on_host.stdout)
            image.run("nic", "add", "--qmp", sock, "--model", "rtl8139", "--id", "img1", mounts=(work,))
            assert asyncio.run(_peripherals(work)) == {"cold0", "img1"}
            assert _nics(image.run("nic", "list", "--qmp", sock, "--json", mounts=(work,))) == {
                "cold0": "e1000", "img1": "rtl8139",
            }  # fmt: skip
        finally:
            qemu.stop()


async def _peripherals(work: Path) -> set[str]:
    """The ids of QEMU's user-created devices, from its second monitor (not through qmpnet)."""
    async with aux_monitor(work) as monitor:
        listed = await monitor.execute("qom-list", {"path": "/machine/peripheral"})
    assert isinstance(listed, list)
    return {str(prop["name"]) for prop in listed if str(prop.get("type", "")).startswith("child<")}


def test_serve_in_the_container_answers_through_the_hosts_mosquitto(image: Image) -> None:
    with scratch("qmpnet-image-") as work:
        broker = Mosquitto(work).start()
        qemu = Qemu(work / "vm1.qmp", extra=aux_args(work)).start()
        root, controller = fresh_root(), "boxed"
        name = f"qmpnet-serve-{uuid.uuid4().hex[:8]}"
        env = {**FAST_ENV, "QMPNET_MQTT__TOPIC_ROOT": root, "QMPNET_MQTT__PROTOCOL": MOSQUITTO_5.protocol}
        try:
            _podman(*image.argv(
                "--detach", "--name", name, "--network=host", f"--volume={work}:{work}",
                *(f"--env={key}={value}" for key, value in env.items()),
                image.tag, "serve", "--broker", broker.url, "--controller-id", controller,
                "--guest", f"vm1={qemu.qmp}",
            ))  # fmt: skip
            asyncio.run(_serve_answers(broker.url, root, controller, work, name))
            _podman("stop", "--time", "20", name)
            state = _podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
            assert state == "0", _podman("logs", name, check=False).stderr
            asyncio.run(wait_retained(broker.url, f"{root}/{controller}/status", lambda s: s["state"] == "offline"))
        finally:
            _podman("rm", "--force", "--time", "0", name, check=False)
            qemu.stop()
            broker.stop()
    assert name not in image.left()


async def _serve_answers(url: str, root: str, controller: str, work: Path, name: str) -> None:
    base = f"{root}/{controller}"
    try:
        await wait_retained(url, f"{base}/status", lambda s: s["state"] == "online", timeout=30)
        await wait_retained(url, f"{base}/guest/vm1/status", lambda s: s["state"] == "connected", timeout=30)
    except TimeoutError as err:
        logs = _podman("logs", name, check=False)
        raise AssertionError(f"the container's controller is not online\n{logs.stdout}{logs.stderr}") from err
    async with Client(settings=client_settings(url, MOSQUITTO_5, root), timeout=10) as client:
        nic = await client.add_nic(controller, "vm1", {"model": "e1000", "id": "m1"})
        assert (nic.id, nic.model) == ("m1", "e1000")
        assert [n.id for n in await client.list_nics(controller, "vm1")] == ["m1"]
    assert await _peripherals(work) == {"m1"}


class Registry(Process):
    """A registry (Debian's docker-registry, the CNCF distribution) on a free loopback port, over plain HTTP."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("registry", workdir)
        self.port = free_port()
        self.config = workdir / "registry.yml"
        self.config.write_text(
            f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        # podman's own registry settings (CONTAINERS_REGISTRIES_CONF) let it speak plain HTTP to this one.
        self.registries = workdir / "registries.conf"
        self.registries.write_text(f'[[registry]]\nlocation = "{self.host}"\ninsecure = true\n')

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        """Start and wait until its API answers."""
        self.spawn(["docker-registry", "serve", str(self.config)])
        self.wait_until(self._answers, 10, "docker-registry")
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False


@needs.tool("docker-registry", "docker-registry")
def test_the_base_comes_from_a_registry_when_one_answers(image: Image) -> None:
    run = uuid.uuid4().hex[:10]
    tag = f"localhost/qmpnet-test:{run}-registry"
    with scratch("qmpnet-registry-") as work:
        registry = Registry(work).start()
        remote = f"{registry.host}/qmpnet-test/debian:12-slim"
        env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(registry.registries), "QMPNET_IMAGE_FROM": remote}
        try:
            # The registry holds the base this module's build used; local storage does not have it under its name.
            _podman("push", "--tls-verify=false", image.base, remote)
            assert _podman("image", "exists", remote, check=False).returncode == 1
            built = subprocess.run(
                [str(REPO / "scripts" / "image"), "--tag", tag],
                capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False, env=env,
            )  # fmt: skip
            assert built.returncode == 0, built.stderr[-3000:]
            assert f"image: pulled {remote}\n" in built.stderr
            assert _built_on(built.stderr, tag) == remote
            assert "debootstrap" not in built.stderr
            version = _podman(*image.argv("--rm", "--network=none", tag, "--version")).stdout
            assert version.strip() == f"qmpnet {qmpnet.__version__}"
        finally:
            _podman("rmi", tag, check=False)
            _podman("rmi", remote, check=False)  # only this name: the image is the module's base
            registry.stop()
    assert _podman("image", "exists", tag, check=False).returncode == 1
    assert _podman("image", "exists", image.base, check=False).returncode == 0
