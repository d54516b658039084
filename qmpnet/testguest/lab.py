"""The lab host: a full Debian kernel under QEMU, with the host's own userland, for kernel-bound features.

This machine's kernel may lack what some of qmpnet's network modes need (an IOMMU and vfio, netem, bridge VLAN
filtering, /dev/vhost-net). The lab boots Debian 12's generic kernel with all of its modules (:mod:`.labimage`) on
a q35 machine with an emulated IOMMU, and runs commands in it as root::

    lab = Lab.ensure(functions=2)
    result = lab.run(["uname", "-r"])

Design decisions:

- **The host's userland, not a distribution.** The host's root file system is shared read-only over virtio-9p
  and mounted under a tmpfs overlay (writes stay in the lab); the current directory (at boot) and any
  ``shares`` are mounted writable at their own paths. A venv or a build made on the host runs inside as it is.
  /tmp, /run and /dev/shm are the lab's own tmpfs (unix sockets need a local file system).
- **Assignable functions.** ``functions`` emulated e1000e NICs, each behind its own ``pcie-root-port`` and so in its
  own IOMMU group, bound to e1000e; and a pair of e1000 NICs behind a ``pcie-pci-bridge``, which share a group.
  Commands see their addresses in ``QMPNET_LAB_FUNCTIONS`` and ``QMPNET_LAB_SHARED_GROUP``.
- **Commands over TCP, one connection each.** The agent (:mod:`.labagent`) listens in the lab; QEMU forwards a
  loopback port of the host to it (user networking, ``restrict=on``: the lab reaches nothing else). A token only
  root can read authenticates each request. Output streams back as it comes, and the exit status ends it.
- **One lab per user, reused.** Its QEMU runs in its own session, detached from the command that booted it; the
  state directory (``~/.cache/qmpnet/lab`` or ``$QMPNET_LAB_DIR``) holds its pid, port, token and console log,
  and a lock file serialises boots and stops. ``lab --stop`` (:meth:`Lab.stop`) ends it.
- **Every wait has a deadline.** A boot that does not reach the agent in time stops QEMU and raises
  :class:`LabError` with the console's tail; so does a QEMU that exits during boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from . import labagent
from .build import BuildError, default_cache_dir
from .labimage import LabImage, ensure_lab_image
from .machine import QEMU_BINARY, detect_accel

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

__all__ = ["DEFAULT_FUNCTIONS", "Lab", "LabError", "LabResult", "lab_dir"]

DEFAULT_FUNCTIONS = 2
BOOT_TIMEOUT = 600.0
CONNECT_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
MEMORY_MIB = 2048
CPUS = 2
CONSOLE_TAIL = 40
KERNEL_ARGS = "console=ttyS0 panic=-1 quiet intel_iommu=on mitigations=off tsc=reliable no_timer_check"
STATE_FILE = "state.json"


class LabError(RuntimeError):
    """The lab cannot be built, booted, reached, or cannot run a command."""


def lab_dir() -> Path:
    """The lab's state directory: ``$QMPNET_LAB_DIR``, else ``~/.cache/qmpnet/lab``."""
    configured = os.environ.get("QMPNET_LAB_DIR")
    return Path(configured) if configured else default_cache_dir().parent / "lab"


@dataclass(frozen=True)
class LabResult:
    """What a command in the lab did: its exit status and its output (stdout and stderr interleaved)."""

    status: int
    output: str

    @property
    def ok(self) -> bool:
        """Whether the command exited with status 0."""
        return self.status == 0


@dataclass(frozen=True)
class LabState:
    """What a later invocation needs to reuse a running lab."""

    pid: int
    port: int
    functions: int
    release: str
    shares: list[str] = field(default_factory=list)
    boot_seconds: float = 0.0


class Lab:
    """A running lab host (:meth:`ensure` boots or finds it)."""

    def __init__(self, directory: Path, state: LabState, token: str, *, booted_here: bool) -> None:
        self.directory = directory
        self.state = state
        self.token = token
        self.booted_here = booted_here
        self._info: dict[str, object] | None = None

    # --- life cycle --------------------------------------------------------------------------------------------

    @classmethod
    def ensure(
        cls,
        functions: int = DEFAULT_FUNCTIONS,
        *,
        shares: Sequence[Path] = (),
        directory: Path | None = None,
        boot_timeout: float = BOOT_TIMEOUT,
        progress: Callable[[str], None] | None = None,
    ) -> Lab:
        """Return the running lab, booting one first if there is none.

        Args:
            functions: How many assignable functions a newly booted lab gets (a running lab must have as many).
            shares: Directories shared writable (the current directory is always one).
            directory: The state directory; :func:`lab_dir` when None.
            boot_timeout: Seconds a boot may take to reach the agent.
            progress: Called with a short line at each slow step.

        Raises:
            LabError: No image and no way to build it, the boot failed or timed out, or the running lab does not
                fit (fewer functions, the current directory not shared).
        """
        where = (directory or lab_dir()).absolute()
        say = progress or (lambda _line: None)
        wanted = sorted({str(Path.cwd().absolute()), *(str(Path(s).absolute()) for s in shares)})
        spaced = [s for s in wanted if any(c.isspace() for c in s)]
        if spaced:  # the init script splits the list of shares on blanks
            raise LabError(f"the lab cannot share a directory whose path holds a blank: {spaced[0]!r}")
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(where):
            running = cls._find(where)
            if running is not None:
                running.check_fits(functions, wanted)
                return running
            return cls._boot(where, functions, wanted, boot_timeout, say)

    @classmethod
    def find(cls, directory: Path | None = None) -> Lab | None:
        """The running lab, or None."""
        return cls._find((directory or lab_dir()).absolute())

    @classmethod
    def _find(cls, where: Path) -> Lab | None:
        try:
            raw = json.loads((where / STATE_FILE).read_text())
            state = LabState(**raw)
            token = (where / labagent.TOKEN_FILE).read_text().strip()
        except (OSError, ValueError, TypeError):
            return None
        if not _alive(state.pid):
            return None
        return cls(where, state, token, booted_here=False)

    def check_fits(self, functions: int, shares: Sequence[str]) -> None:
        """Raise :class:`LabError` unless this lab has ``functions`` functions and shares ``shares`` writable."""
        if self.state.functions < functions:
            msg = (
                f"the running lab (pid {self.state.pid}) has {self.state.functions} functions, not {functions}: "
                "end it with `python -m qmpnet.testguest lab --stop` first"
            )
            raise LabError(msg)
        missing = [s for s in shares if not any(s == d or s.startswith(f"{d}/") for d in self.state.shares)]
        if missing:
            msg = (
                f"the running lab (pid {self.state.pid}) shares {', '.join(self.state.shares)} writable, not "
                f"{', '.join(missing)}: end it with `python -m qmpnet.testguest lab --stop` first"
            )
            raise LabError(msg)

    @classmethod
    def _boot(cls, where: Path, functions: int, shares: list[str], timeout: float, say: Callable[[str], None]) -> Lab:
        try:
            image = ensure_lab_image(progress=say)
        except BuildError as err:
            raise LabError(f"no lab image, and it cannot be built: {err}") from err
        token = secrets.token_hex(16)
        token_file = where / labagent.TOKEN_FILE
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        (where / "boot.sh").write_text(_boot_config(image, where, shares))
        port = _free_port()
        console = where / "console.log"
        command = qemu_command(image, where, functions, shares, port)
        (where / "qemu.cmdline").write_text(shlex.join(command) + "\n")
        say(f"booting the lab ({image.release}, {functions} functions); console: {console}")
        started = time.monotonic()
        pid = _start_daemon(command, where, timeout)
        state = LabState(pid=pid, port=port, functions=functions, release=image.release, shares=shares)
        lab = cls(where, state, token, booted_here=True)
        deadline = started + timeout
        while True:
            if not _alive(pid):
                raise LabError(f"the lab's QEMU exited during boot\n{lab.diagnostics()}")
            with contextlib.suppress(LabError, OSError):
                lab._info = lab._request({"op": "info"}, lambda _kind, _data: None, timeout=CONNECT_TIMEOUT)
                break
            if time.monotonic() > deadline:
                lab._kill(pid)
                msg = f"the lab did not answer within {timeout:.0f} s of booting\n{lab.diagnostics()}"
                raise LabError(msg)
            time.sleep(1.0)
        lab.state = LabState(**{**asdict(state), "boot_seconds": round(time.monotonic() - started, 1)})
        (where / STATE_FILE).write_text(json.dumps(asdict(lab.state)) + "\n")
        say(f"lab up after {lab.state.boot_seconds:.1f} s (pid {pid})")
        return lab

    def stop(self) -> None:
        """End the lab: SIGTERM, then SIGKILL after a deadline; its state goes."""
        with _locked(self.directory):
            self._kill(self.state.pid)
            (self.directory / STATE_FILE).unlink(missing_ok=True)

    @staticmethod
    def _kill(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    # --- commands ------------------------------------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        """The lab's kernel release and functions, as its agent reports them."""
        if self._info is None:
            self._info = self._request({"op": "info"}, lambda _kind, _data: None, timeout=CONNECT_TIMEOUT)
        return self._info

    @property
    def functions(self) -> list[str]:
        """The PCI addresses of the assignable functions (each in its own IOMMU group)."""
        return [str(f) for f in self.info()["functions"]]  # type: ignore[attr-defined]

    @property
    def shared_group(self) -> list[str]:
        """The PCI addresses of the pair of functions that share an IOMMU group."""
        return [str(f) for f in self.info()["shared_group"]]  # type: ignore[attr-defined]

    def answers(self, within: float) -> bool:
        """Whether the lab's agent answers within ``within`` seconds; False at once when its QEMU has ended.

        A lost connection alone cannot tell a lab that died from one that merely dropped a client: QEMU closes its
        sockets well before its process ends, so this polls until one of the two is certain (or time runs out: a
        wedged lab answers nothing and counts as gone).
        """
        deadline = time.monotonic() + within
        while _alive(self.state.pid):
            with contextlib.suppress(LabError):
                self._request({"op": "info"}, lambda _kind, _data: None, timeout=CONNECT_TIMEOUT)
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)
        return False

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        echo: IO[bytes] | None = None,
    ) -> LabResult:
        """Run ``argv`` in the lab as root; return its status and output.

        Args:
            argv: The command and its arguments (looked up in ``PATH``).
            cwd: Its directory; the current one when None.
            env: Its environment; this process's when None (the lab adds ``QMPNET_LAB_*``).
            timeout: Seconds it may take (None: no limit); past it, it is killed and :class:`LabError` raised.
            echo: Also write its output there as it comes (``sys.stdout.buffer``).

        Raises:
            LabError: The lab cannot be reached, the command cannot run, or it timed out.
        """
        chunks: list[bytes] = []

        def collect(kind: int, data: bytes) -> None:
            chunks.append(data)
            if echo is not None:
                echo.write(data)
                echo.flush()
            del kind

        request: dict[str, object] = {
            "op": "run",
            "argv": list(argv),
            "cwd": str((cwd or Path.cwd()).absolute()),
            "env": dict(os.environ if env is None else env),
        }
        answer = self._request(request, collect, timeout=timeout)
        status: int = answer["status"]  # type: ignore[assignment]
        return LabResult(status=status, output=b"".join(chunks).decode(errors="replace"))

    def shell(self, script: str, *, timeout: float | None = None) -> LabResult:
        """Run a ``sh -c`` script in the lab (see :meth:`run`)."""
        return self.run(["sh", "-c", script], timeout=timeout)

    def stream(self, argv: Sequence[str], *, timeout: float | None = None) -> int:
        """Run ``argv`` with its stdout and stderr going to this process's; return its exit status."""

        def write(kind: int, data: bytes) -> None:
            out = sys.stdout.buffer if kind == labagent.STDOUT else sys.stderr.buffer
            out.write(data)
            out.flush()

        request: dict[str, object] = {
            "op": "run", "argv": list(argv), "cwd": str(Path.cwd().absolute()), "env": dict(os.environ)
        }
        answer = self._request(request, write, timeout=timeout)
        status: int = answer["status"]  # type: ignore[assignment]
        return status

    def _request(
        self, request: dict[str, object], output: Callable[[int, bytes], None], timeout: float | None
    ) -> dict[str, object]:
        try:
            conn = socket.create_connection(("127.0.0.1", self.state.port), timeout=CONNECT_TIMEOUT)
        except OSError as err:
            raise LabError(f"cannot reach the lab's agent on 127.0.0.1:{self.state.port}: {err}") from err
        with conn:
            conn.settimeout(timeout)
            try:
                conn.sendall(json.dumps({**request, "token": self.token}).encode() + b"\n")
                reader = conn.makefile("rb")
                while True:
                    header = reader.read(labagent.HEADER.size)
                    if len(header) < labagent.HEADER.size:
                        raise LabError("the lab's agent closed the connection without an answer")
                    kind, length = labagent.HEADER.unpack(header)
                    payload = reader.read(length)
                    if kind == labagent.END:
                        answer: dict[str, object] = json.loads(payload)
                        break
                    output(kind, payload)
            except TimeoutError as err:
                raise LabError(f"{request.get('argv', request['op'])} did not finish within {timeout} s") from err
            except OSError as err:
                raise LabError(f"lost the lab's agent: {err}") from err
        if "error" in answer:
            raise LabError(str(answer["error"]))
        return answer

    # --- diagnostics ---------------------------------------------------------------------------------------------

    def console_tail(self, lines: int = CONSOLE_TAIL) -> str:
        """The last lines of the lab's console."""
        try:
            text = (self.directory / "console.log").read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def diagnostics(self) -> str:
        """QEMU's command line and stderr and the console's tail, for error messages and reports."""
        parts = []
        for name in ("qemu.cmdline", "qemu.stderr"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {name}\n{(self.directory / name).read_text(errors='replace').strip()}")
        parts.append(f"--- console (last {CONSOLE_TAIL} lines)\n{self.console_tail()}")
        return "\n".join(parts)


def qemu_command(image: LabImage, where: Path, functions: int, shares: Sequence[str], port: int) -> list[str]:
    """The lab's QEMU command line."""
    args = [
        QEMU_BINARY, "-nodefaults", "-display", "none", "-no-reboot",
        "-machine", "q35", "-accel", detect_accel(), "-cpu", "max", "-smp", str(CPUS), "-m", str(MEMORY_MIB),
        "-device", "intel-iommu",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"{KERNEL_ARGS} lab.conf={where / 'boot.sh'}",
        "-chardev", f"file,id=console,path={where / 'console.log'}", "-serial", "chardev:console",
        "-fsdev", "local,id=host,path=/,readonly=on,security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=host,mount_tag=host",
        "-netdev", f"user,id=control,restrict=on,hostfwd=tcp:127.0.0.1:{port}-10.0.2.15:7000",
        "-device", "virtio-net-pci,netdev=control",
    ]  # fmt: skip
    for index, path in enumerate(shares):
        args += [
            "-fsdev", f"local,id=share{index},path={path},security_model=none,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=share{index},mount_tag=share{index}",
        ]  # fmt: skip
    for index in range(functions):
        args += [
            "-device", f"pcie-root-port,id=lab_rp{index},chassis={index + 1}",
            "-device", f"e1000e,bus=lab_rp{index},id=lab_fn{index}",
        ]  # fmt: skip
    args += [
        "-device", f"pcie-root-port,id=lab_rp_bridge,chassis={functions + 1}",
        "-device", "pcie-pci-bridge,id=lab_bridge,bus=lab_rp_bridge",
        "-device", "e1000,bus=lab_bridge,addr=1,id=lab_shared0",
        "-device", "e1000,bus=lab_bridge,addr=2,id=lab_shared1",
    ]  # fmt: skip
    return args


def _boot_config(image: LabImage, where: Path, shares: Sequence[str]) -> str:
    values = {
        "LAB_RELEASE": image.release,
        "LAB_MODULES": str(image.modules),
        "LAB_PYTHON": sys.executable,
        "LAB_AGENT": str(Path(labagent.__file__).absolute()),
        "LAB_STATE": str(where),
        "LAB_SHARES": " ".join(f"share{index}={path}" for index, path in enumerate(shares)),
    }
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())


def _start_daemon(command: Sequence[str], where: Path, timeout: float) -> int:
    """Start QEMU daemonized (it outlives this process, reparented to init); return its pid."""
    pidfile = where / "qemu.pid"
    pidfile.unlink(missing_ok=True)
    with (where / "qemu.stderr").open("wb") as stderr:
        try:
            done = subprocess.run(
                [*command, "-daemonize", "-pidfile", str(pidfile)],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True, timeout=timeout,
                check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as err:
            raise LabError(f"cannot start the lab's QEMU: {err}") from err
    stderr_text = (where / "qemu.stderr").read_text(errors="replace").strip()
    if done.returncode != 0 or not pidfile.exists():
        raise LabError(f"the lab's QEMU did not start (exit status {done.returncode}): {stderr_text}")
    return int(pidfile.read_text().strip())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own child, not reaped yet) is not a running lab.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@contextlib.contextmanager
def _locked(where: Path) -> Iterator[None]:
    with (where / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
