"""qmpnet's pytest plugin: booted QEMU guests, an MQTT broker and a qmpnet controller as fixtures.

Installed with qmpnet (entry point ``pytest11``, name ``qmpnet``), so any test suite in an environment that has
qmpnet gets, with no ``conftest.py``:

``qmpnet_guest``
    A guest booted with ``-nographic`` for one test (busybox by default, about 4 s under TCG; Debian 12 with
    systemd and qemu-guest-agent, about 15-30 s). Choose with ``@pytest.mark.qmpnet_guest(machine="q35",
    flavour="debian")``; other keywords: ``root_ports`` (q35, default 4), ``pcie_pci_bridge`` (q35, default
    true), ``memory_mb``, ``extra_args``. It yields a :class:`BootedGuest`: ``qmp_path``, ``qga_path``,
    ``await shell(cmd)``, ``connect()``, ``await wait_for(mac, want)``.
``qmpnet_broker``
    A mosquitto broker on a free loopback port (``.url``).
``qmpnet_controller``
    ``qmpnet serve`` on that broker serving the ``qmpnet_guest`` as guest ``vm`` (``.url``, ``.controller_id``,
    ``.guest``, ``client()``), ready once its retained status says the guest is connected.
``qmpnet_guest_image``, ``qmpnet_debian_image``
    The cached guest images (built on first use; the Debian one needs root and debootstrap).
``qmpnet_lab``, ``@pytest.mark.qmpnet_lab``
    The lab host (a Debian kernel with an IOMMU, vfio, netem, VLAN filtering and vhost-net, running the host's
    own userland), one for the whole run, and tests that run inside it: see :mod:`qmpnet.testguest.labplugin`.

For another scope (one guest per module, say) use :func:`boot` in a fixture of your own. When a test fails, its
report gets a section per guest and process it used: QEMU's command line, its stderr and the console tail.

The guest fixtures are coroutines and need pytest-asyncio (qmpnet's ``test`` extra). Without it the plugin still
loads, so pytest keeps working in environments that have qmpnet for other reasons; those fixtures then fail with a
message saying so.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

from qmpnet.adapters.qga import GuestAgent, Want, satisfies, wait_for
from qmpnet.api.direct import connect
from qmpnet.client import Client
from qmpnet.core.model import GuestView
from qmpnet.core.names import normalize_mac
from qmpnet.errors import NotVerified
from qmpnet.settings import QgaSettings
from qmpnet.testguest import AgentTimeoutError, TestMachine, ensure_image
from qmpnet.testguest.debian import DebianImage, ensure_debian_image
from qmpnet.testguest.labplugin import (
    lab_collection_finish,
    lab_collection_modifyitems,
    lab_configure,
    lab_runtest_logreport,
    lab_terminal_summary,
    lab_unconfigure,
    qmpnet_lab,
)
from qmpnet.testguest.probe import wait_online
from qmpnet.testguest.services import Mosquitto, Process, Serve, scratch

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised only where pytest-asyncio is missing
    pytest_asyncio = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Sequence
    from contextlib import AbstractAsyncContextManager

    from qmpnet.guest.guest import Guest
    from qmpnet.settings import Settings
    from qmpnet.testguest import GuestImage, GuestInterface
    from qmpnet.testguest.machine import Flavour, MachineType

__all__ = ["BootedGuest", "ServedController", "boot", "qmpnet_lab"]

MARKER = "qmpnet_guest"
QEMU_BINARY = "qemu-system-x86_64"
CONTROLLER_ID = "qmpnet-test"
GUEST_NAME = "vm"
#: q35 hot-plugs only into free root ports: the default guest has a few, and a bridge for conventional PCI models.
Q35_ROOT_PORTS = 4


class BootedGuest:
    """A running test guest, as the ``qmpnet_guest`` fixture and :func:`boot` give it."""

    def __init__(self, machine: TestMachine) -> None:
        self.machine = machine
        # Fixed for the machine's life, so read once: its name (QEMU's ``-name``), ``busybox`` or ``debian``, the
        # QMP socket, and qemu-guest-agent's socket when the flavour has one (debian), else None. QEMU serves both.
        self.name: Final = machine.name
        self.flavour: Final = machine.flavour
        self.qmp_path: Final = machine.qmp_path
        self.qga_path: Final = machine.qga_path

    @property
    def root_ports(self) -> list[str]:
        """The free pcie-root-ports of a q35 guest, by id."""
        return self.machine.root_port_ids

    async def shell(self, cmd: str, timeout: float = 30.0) -> str:
        """Run ``cmd`` with ``/bin/sh`` in the guest and return its standard output.

        Raises:
            AgentError: The command exited non-zero, or the agent failed.
        """
        return await self.machine.shell(cmd, timeout=timeout)

    async def wait_for(self, mac: str, want: Want = "present", timeout: float = 30.0) -> GuestView | None:
        """Wait until the guest's interface with ``mac`` is in the ``want`` state and return what the guest sees.

        ``want`` is ``present``, ``address`` (an address other than link-local), ``absent`` (returns None),
        ``carrier_up`` or ``carrier_down``, as for
        :func:`qmpnet.adapters.qga.wait_for`. The Debian guest answers through
        qemu-guest-agent (the socket must be free: QEMU serves one client at a time); the busybox guest through
        its own agent's reports (it runs no DHCP client by itself: ``address`` needs
        ``guest.machine.agent.dhcp(ifname)``).

        Raises:
            NotVerified: Not within ``timeout`` seconds; the message says what the guest showed.
        """
        if self.qga_path is not None:
            async with GuestAgent.connect(self.qga_path, QgaSettings()) as agent:
                return await wait_for(agent, mac, want, timeout=timeout)
        wanted = normalize_mac(mac)

        def look(interfaces: list[GuestInterface]) -> GuestView | _Absent | None:
            found = next((i for i in interfaces if i.mac.lower() == wanted), None)
            view = _view(found) if found is not None else None
            if not satisfies(view, want):
                return None
            return view if view is not None else _ABSENT

        try:
            result = await self.machine.agent.wait_for(look, timeout=timeout)
        except AgentTimeoutError as err:
            raise NotVerified(f"the guest did not show {want} for {wanted} within {timeout:g} s: {err}") from err
        return result if isinstance(result, GuestView) else None

    def connect(self, settings: Settings | None = None) -> AbstractAsyncContextManager[Guest]:
        """``qmpnet.connect`` on this guest's QMP socket: ``async with guest.connect() as g: await g.add_nic(...)``."""
        qga = str(self.qga_path) if self.qga_path is not None else None
        return connect(str(self.qmp_path), name=self.name, settings=settings, qga=qga)

    def describe(self) -> str:
        """The machine's description for failure reports (command line, stderr, console tail)."""
        return self.machine.describe()


class _Absent:
    """What the busybox agent's predicate returns for "no such interface" (its waits need a truthy result)."""


_ABSENT = _Absent()


def _view(interface: GuestInterface) -> GuestView:
    return GuestView(
        ifname=interface.name,
        mac=interface.mac,
        carrier=interface.carrier,
        operstate=interface.operstate,
        addresses=interface.ipv4,
    )


def _require_qemu() -> None:
    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"{QEMU_BINARY} is not installed (apt-get install qemu-system-x86 busybox-static)")


def guest_image() -> GuestImage:
    """The busybox guest image (built and cached on first use); skips the test when QEMU is missing."""
    _require_qemu()
    return ensure_image()


def debian_image() -> DebianImage:
    """The Debian guest image (built and cached on first use, as root); skips the test when QEMU is missing."""
    _require_qemu()
    return ensure_debian_image()


@contextlib.asynccontextmanager
async def boot(  # noqa: PLR0913 - keyword-only knobs mirroring the marker's
    *,
    machine: MachineType = "pc",
    flavour: Flavour = "busybox",
    image: GuestImage | None = None,
    root_ports: int | None = None,
    pcie_pci_bridge: bool | None = None,
    memory_mb: int | None = None,
    extra_args: Sequence[str] = (),
    name: str | None = None,
) -> AsyncIterator[BootedGuest]:
    """Boot a test guest for as long as the context is open (what ``qmpnet_guest`` does for one test).

    Args:
        machine: ``pc`` or ``q35``.
        flavour: ``busybox`` (fast, the in-guest agent) or ``debian`` (systemd, udev, networkd, qemu-guest-agent).
        image: The image to boot; the cached one of the flavour when None.
        root_ports: Free pcie-root-ports (q35 only; default 4).
        pcie_pci_bridge: A pcie-pci-bridge for conventional PCI models (q35 only; default true).
        memory_mb: Guest memory (default 256, Debian 512).
        extra_args: More QEMU arguments.
        name: The guest's name (default ``<flavour>-<machine>``).

    Raises:
        MachineError: QEMU did not start or the guest did not boot; the message describes the machine.
    """
    if image is None:
        image = debian_image() if flavour == "debian" else guest_image()
    q35 = machine == "q35"
    async with TestMachine(
        image,
        machine=machine,
        flavour=flavour,
        root_ports=(Q35_ROOT_PORTS if root_ports is None else root_ports) if q35 else 0,
        pcie_pci_bridge=(True if pcie_pci_bridge is None else pcie_pci_bridge) if q35 else False,
        memory_mb=memory_mb,
        extra_args=extra_args,
        name=name or f"{flavour}-{machine}",
    ) as running:
        yield BootedGuest(running)


class ServedController:
    """A ``qmpnet serve`` process on the test broker, serving the test guest as :attr:`guest`."""

    def __init__(self, serve: Serve, broker: Mosquitto, guest: str) -> None:
        self.serve = serve
        self.broker = broker
        self.guest = guest
        # Fixed for the processes' life: the broker's URL and the controller's id in topics (``qmpnet/<id>/...``).
        self.url: Final = broker.url
        self.controller_id: Final = serve.controller_id

    def client(self, timeout: float | None = None) -> Client:
        """A :class:`qmpnet.client.Client` on the broker (``async with controller.client() as c``)."""
        return Client(self.url, timeout=timeout)

    def describe(self) -> str:
        """The controller's and the broker's command lines and log tails."""
        return f"{self.serve.describe()}\n{self.broker.describe()}"


# --- hooks and fixtures ------------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``qmpnet_guest`` and ``qmpnet_lab`` markers."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}(machine='pc', flavour='busybox', root_ports=4, pcie_pci_bridge=True, memory_mb=None, "
        "extra_args=()): the guest the qmpnet_guest fixture boots",
    )
    lab_configure(config)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Outside the lab, tests marked ``qmpnet_lab`` are replaced by stand-ins that run them in the lab."""
    lab_collection_modifyitems(items)


@pytest.hookimpl(tryfirst=True)  # before the terminal lists the tests (--collect-only): in the order they will run
def pytest_collection_finish(session: pytest.Session) -> None:
    """Outside the lab, the stand-ins go last and their inner run starts now, beside the other tests."""
    lab_collection_finish(session)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Inside the lab, hand each report to the stand-in outside."""
    lab_runtest_logreport(report)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:  # noqa: ANN401 - private type
    """The lab's timings."""
    lab_terminal_summary(terminalreporter, config)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the lab this run booted."""
    lab_unconfigure(config)


def _described(values: Iterable[object]) -> Iterator[tuple[str, str]]:
    """Failure-report sections for the guests and processes among fixture values (or one level inside)."""
    for value in values:
        members = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else [value]
        for member in members:
            if isinstance(member, TestMachine | BootedGuest):
                yield f"test machine {member.name}", member.describe()
            elif isinstance(member, ServedController):
                yield "qmpnet controller", member.describe()
            elif isinstance(member, Process):
                yield f"process {member.name}", member.describe()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Describe the guests and processes a failed test used."""
    report = yield
    if report.failed and isinstance(item, pytest.Function):
        seen: set[str] = set()
        for title, text in _described(item.funcargs.values()):
            if title not in seen:
                seen.add(title)
                report.sections.append((title, text))
    return report


@pytest.fixture(scope="session")
def qmpnet_guest_image() -> GuestImage:
    """The busybox test guest image, built on first use and cached across sessions."""
    return guest_image()


@pytest.fixture(scope="session")
def qmpnet_debian_image() -> DebianImage:
    """The Debian 12 test guest image, built on first use (as root, with debootstrap) and cached."""
    return debian_image()


@pytest.fixture
def qmpnet_broker() -> Iterator[Mosquitto]:
    """A mosquitto broker on a free loopback port, stopped after the test."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    with scratch("qmpnet-broker-") as work:
        broker = Mosquitto(work)
        try:
            yield broker.start()
        finally:
            broker.stop()


def _marker_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        return {}
    if marker.args:
        raise pytest.UsageError(f"@pytest.mark.{MARKER} takes keyword arguments only")
    return dict(marker.kwargs)


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def qmpnet_guest(request: pytest.FixtureRequest) -> AsyncIterator[BootedGuest]:
        """A test guest booted for this test (``@pytest.mark.qmpnet_guest(...)`` chooses it)."""
        options = _marker_options(request)
        flavour = options.get("flavour", "busybox")
        fixture = "qmpnet_debian_image" if flavour == "debian" else "qmpnet_guest_image"
        options.setdefault("image", request.getfixturevalue(fixture))
        async with boot(**options) as booted:
            yield booted

    @pytest_asyncio.fixture
    async def qmpnet_controller(
        qmpnet_broker: Mosquitto, qmpnet_guest: BootedGuest
    ) -> AsyncIterator[ServedController]:
        """``qmpnet serve`` on ``qmpnet_broker``, serving ``qmpnet_guest`` as guest ``vm``."""
        with scratch("qmpnet-serve-") as work:
            serve = Serve(work, qmpnet_broker.url, CONTROLLER_ID, {GUEST_NAME: qmpnet_guest.qmp_path})
            try:
                serve.start()
                await wait_online(serve, qmpnet_broker.url, guests_connected=[GUEST_NAME])
                yield ServedController(serve, qmpnet_broker, GUEST_NAME)
            finally:
                serve.stop()

else:  # pragma: no cover

    @pytest.fixture
    def qmpnet_guest() -> None:
        """Unavailable: needs pytest-asyncio."""
        pytest.fail("the qmpnet_guest fixture needs pytest-asyncio (pip install 'qmpnet[test]')")

    @pytest.fixture
    def qmpnet_controller() -> None:
        """Unavailable: needs pytest-asyncio."""
        pytest.fail("the qmpnet_controller fixture needs pytest-asyncio (pip install 'qmpnet[test]')")
