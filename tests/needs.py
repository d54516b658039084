"""What a test needs from the host (root, a tool, a device), and what happens when it is not there.

Outside CI a test whose needs are not met is skipped, with the reason. In CI (``CI=true`` in the environment;
``.ci/run`` sets it) it fails instead: a green CI run means the host-network tests ran, not that they skipped.

Declare needs as markers, for a module or a test::

    pytestmark = [needs.root("create network namespaces"), needs.tool("nft", "nftables")]

or call :func:`require` in a fixture or test for a need found only at run time. An unmet need skips the test with
its reason. Both conftests (unit and integration) call :func:`check_item` from ``pytest_runtest_setup`` (the
markers) and :func:`fail_skips_in_ci` from ``pytest_runtest_makereport``: in CI every skip, whatever raised it
(these helpers, or a fixture of qmpnet's pytest plugin such as its "QEMU is not installed"), is reported as a
failure with the same reason — except a kernel feature the kernel lacks (:func:`kernel`), which CI cannot
install. A test that needs a feature the lab host's kernel has (netem, VLAN filtering, vfio) does not skip on a
kernel without it: it is marked ``lab`` and runs inside the lab host instead (qmpnet's pytest plugin,
``qmpnet.testguest.labplugin``). This module is importable from both trees because pytest puts ``tests/`` on the path
(``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar, cast

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

__all__ = [
    "ASYNCAPI_CLI", "KERNEL_LACKS", "asyncapi_cli", "check_item", "device", "fail_skips_in_ci", "in_ci", "in_lab",
    "inside_lab", "kernel", "need", "require", "root", "tool", "unmet",
]

CI_NOTE = "(CI=true: a test whose needs are not met fails instead of skipping)"
#: The one kind of skip CI keeps: a test that depends on how the machine's kernel was built (a feature it lacks,
#: or has, so that the other test of the pair runs). CI cannot change the kernel (no modules on these machines);
#: the limit is written in docs/host-networking.md, and on a kernel without the feature its refusal is tested.
KERNEL_LACKS = "kernel: "


def in_ci() -> bool:
    """Whether this run is CI's: ``CI`` is ``true`` (or ``1``/``yes``) in the environment."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def unmet(reason: str) -> NoReturn:
    """Skip the test for ``reason`` (in CI :func:`fail_skips_in_ci` reports it failed)."""
    pytest.skip(reason)


def require(ok: bool, reason: str) -> None:
    """Go on if ``ok``; otherwise :func:`unmet`."""
    if not ok:
        unmet(reason)


def need(ok: bool, reason: str) -> pytest.MarkDecorator:
    """A ``needs`` marker: the test runs only if ``ok`` (evaluated at import), else it is :func:`unmet`."""
    return pytest.mark.needs(ok=ok, reason=reason)


def root(to: str) -> pytest.MarkDecorator:
    """Needs root, ``to`` do something (``root("create network namespaces")``)."""
    return need(os.geteuid() == 0, f"needs root to {to}")


def tool(name: str, package: str) -> pytest.MarkDecorator:
    """Needs program ``name`` on ``PATH``, from Debian package ``package``."""
    return need(shutil.which(name) is not None, f"needs {name} (apt-get install {package})")


def device(path: str) -> pytest.MarkDecorator:
    """Needs the device file ``path`` (``/dev/net/tun``)."""
    return need(Path(path).exists(), f"needs {path}")


#: The AsyncAPI Initiative's CLI as scripts/setup installs it (npm ``@asyncapi/cli``, the version pinned there).
ASYNCAPI_CLI = (
    Path(os.environ.get("QMPNET_TOOLS_CACHE") or Path.home() / ".cache" / "qmpnet" / "tools")
    / "asyncapi-cli-4.1.1" / "node_modules" / ".bin" / "asyncapi"
)  # fmt: skip


def asyncapi_cli() -> pytest.MarkDecorator:
    """Needs :data:`ASYNCAPI_CLI` (and Node, which runs it)."""
    ok = os.access(ASYNCAPI_CLI, os.X_OK) and shutil.which("node") is not None
    return need(ok, f"needs the AsyncAPI CLI at {ASYNCAPI_CLI} and node (./scripts/setup installs them)")


def inside_lab() -> bool:
    """Whether this process runs in the lab host (``QMPNET_LAB`` is set there)."""
    return bool(os.environ.get("QMPNET_LAB"))


def in_lab(test: T) -> T:
    """Mark ``test`` to run inside the lab host: ``lab`` (for ``-m lab``) and the plugin's ``qmpnet_lab``."""
    return cast("T", pytest.mark.qmpnet_lab(pytest.mark.lab(test)))


def kernel(ok: bool, why: str, *, lab: bool = True) -> Callable[[T], T]:
    """Runs only if the kernel is built so that ``ok``.

    Otherwise, with ``lab`` (the lab host's kernel has the feature), the test runs inside the lab host; without
    (a test of a kernel that lacks the feature) it skips with ``why`` (``"no netem ..."``), in CI too.
    """
    if not ok and lab and not inside_lab():
        return in_lab
    mark = need(ok, f"{KERNEL_LACKS}{why}")

    def skip_unless(test: T) -> T:
        return cast("T", mark(test))

    return skip_unless


def check_item(item: pytest.Item) -> None:
    """Apply the ``needs`` markers of ``item`` (called from each conftest's ``pytest_runtest_setup``)."""
    for mark in item.iter_markers("needs"):
        require(bool(mark.kwargs["ok"]), str(mark.kwargs["reason"]))


def fail_skips_in_ci(report: pytest.TestReport) -> pytest.TestReport:
    """In CI, ``report`` of a skipped test becomes a failure with the skip's reason (an xfail stays as it is).

    A skip in setup (a marker, a fixture) then counts as an error, one in the test body as a failure.
    """
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if KERNEL_LACKS in reason:
            return report
        report.outcome = "failed"
        report.longrepr = f"{reason.removeprefix('Skipped: ')} {CI_NOTE}"
    return report
