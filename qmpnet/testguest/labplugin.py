"""The lab host in pytest: the ``qmpnet_lab`` fixture, and tests that run inside the lab (the ``qmpnet_lab`` marker).

Part of qmpnet's pytest plugin (``qmpnet.testguest.plugin`` imports the hooks and the fixture from here).

``qmpnet_lab``
    The lab host (:class:`~qmpnet.testguest.lab.Lab`), one for the whole run: booted on first use unless one is
    running already, stopped at the end of the run if this run booted it. ``run(argv)`` and ``shell(script)``
    return a :class:`~qmpnet.testguest.lab.LabResult`.
``@pytest.mark.qmpnet_lab``
    The test needs the lab's kernel. Outside the lab it is replaced by a stand-in with the same node id, and the
    stand-ins are moved to the end of the run. As soon as collection is done, ONE pytest starts inside the lab for
    all of them (so module and session fixtures, booted guests above all, are shared as usual), in a thread, while
    the other tests run here; each stand-in then waits for it and reports its own test's outcome, with the
    failure's text and captured output from inside. Inside the lab (``QMPNET_LAB`` is set) it runs as it is.

A lab test that fails is run again in a new inner pytest, up to twice (guests under nested KVM on the lab's emulated
SVM are now and then reset mid-test); a lab that dies during the inner run is booted again and the run repeated.
The run's summary says both.

The inner run writes its reports as JSON lines to ``$QMPNET_LAB_RESULTS`` (a file in the run's root directory,
which the lab shares writable) and its terminal output to a log beside it; both stay after a failed run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .lab import Lab, LabError, LabResult

__all__ = [
    "LAB_MARKER",
    "LabItem",
    "lab_collection_finish",
    "lab_collection_modifyitems",
    "lab_configure",
    "lab_runtest_logreport",
    "lab_terminal_summary",
    "lab_unconfigure",
    "qmpnet_lab",
]

LAB_MARKER = "qmpnet_lab"
RESULTS_ENV = "QMPNET_LAB_RESULTS"
RESULTS_DIR = ".qmpnet-lab"
SUITE_TIMEOUT = 1800.0
#: How many of the lab's slowest tests the run's summary names.
SLOWEST = 6
#: At most this many failed lab tests are run again (more is a failure of qmpnet's, not of the lab's guests).
RERUN_MOST = 4
#: How many times a failed lab test is run again, each time in a new pytest, until it passes.
RERUNS = 2
#: How long a lab whose connection broke may take to answer again before it counts as dead.
PROBE_SECONDS = 60.0
#: How many lines of a dead lab's console the run's summary shows.
CONSOLE_LINES = 12
_SESSION = pytest.StashKey["LabSession"]()
#: The inner pytest's command line, before the node ids.
_PYTEST: tuple[str, ...] = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA")


def inside_lab() -> bool:
    """Whether this process runs in the lab host."""
    return bool(os.environ.get("QMPNET_LAB"))


class LabSession:
    """The run's lab (booted on first use) and the one inner pytest run of its ``qmpnet_lab`` tests.

    The inner run goes on in a thread of its own (:meth:`start`) while the rest of the run goes on: the lab's
    tests wait on guests booted under nested virtualisation most of their time, and the run's other tests need not
    wait for them. Its results are read only once the thread has ended (:meth:`result` waits for it).
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.nodeids: list[str] = []
        self.lab: Lab | None = None
        self.results: dict[str, list[dict[str, Any]]] | None = None
        self.suite_error: str | None = None
        self.timings: list[str] = []
        self.kept: list[Path] = []
        self._last_console: list[str] = []
        self._booting = threading.Lock()  # one boot, whichever thread asks first (the inner run's, a fixture)
        self._runner: threading.Thread | None = None
        self._closing = False  # the run is ending: no lab is booted any more

    def start(self) -> None:
        """Start the inner run of :attr:`nodeids` in a thread, unless it runs or ran already."""
        if self.nodeids and self._runner is None and self.results is None:
            self._runner = threading.Thread(target=self._run_suite_reported, name="qmpnet-lab-suite", daemon=True)
            self._runner.start()

    def _run_suite_reported(self) -> None:
        try:
            self._run_suite()
        except Exception as err:  # noqa: BLE001 - a thread's error would be lost: every stand-in reports it instead
            self.suite_error = f"the lab suite's thread failed: {type(err).__name__}: {err}"

    def ensure(self, *, after_inner_run: bool = False) -> Lab:
        """The lab, booted (or found) on first use; ``after_inner_run``: once the inner run has ended."""
        if after_inner_run and self._runner is not None:
            self._runner.join()
        with self._booting:
            return self._ensure()

    def _ensure(self) -> Lab:
        if self._closing:
            raise LabError("the test run is ending: no lab is booted for it any more")
        if self.lab is None:
            started = time.monotonic()
            self.lab = Lab.ensure(shares=[self.config.rootpath])
            if self.lab.booted_here:
                self.timings.append(f"lab boot: {self.lab.state.boot_seconds:.1f} s")
            else:
                self.timings.append(f"lab reused (pid {self.lab.state.pid}) in {time.monotonic() - started:.1f} s")
        return self.lab

    def result(self, nodeid: str) -> list[dict[str, Any]]:
        """The reports of ``nodeid`` from the inner run (waited for; run now if it was not started)."""
        if self._runner is not None:
            self._runner.join()
        elif self.results is None:
            self._run_suite()
        if self.suite_error is not None:
            pytest.fail(self.suite_error, pytrace=False)
        return (self.results or {}).get(nodeid, [])

    def _run_suite(self) -> None:
        self.results = {}
        base = self.config.rootpath / RESULTS_DIR
        base.mkdir(exist_ok=True)
        first = self._suite(self.nodeids, base)
        if first is None:
            return
        self.results = first
        failed = [nodeid for nodeid in self.nodeids if _failed(first.get(nodeid, []))]
        if len(failed) <= RERUN_MOST:
            for _ in range(RERUNS):
                if not failed:
                    break
                failed = self._run_again(failed, base)
        self.timings += _slowest(self.results)
        with contextlib.suppress(OSError):
            base.rmdir()

    def _run_again(self, failed: list[str], base: Path) -> list[str]:
        """Run the ``failed`` tests once more in a new pytest (new guests); the tests that failed again.

        Their outcome is this run's.

        The guests in the lab run under KVM on the lab's TCG-emulated SVM, which now and then resets a guest (its
        QEMU exits in the middle of a test) or panics the lab: a failure there says little about qmpnet. A test
        that fails for a reason of qmpnet's fails every time. The run's summary names every test run again with each
        outcome, and the log of each run with a failure is kept.
        """
        self.timings.append(
            f"{len(failed)} lab test(s) failed and were run again in a new pytest (guests under nested KVM on the lab's"
            " emulated SVM are not always stable; the failed run's log is kept):"
        )
        second = self._suite(failed, base)
        if second is None:
            self.timings.append(f"  it could not run ({self.suite_error}): the earlier run's outcome stands")
            self.suite_error = None
            return []
        assert self.results is not None  # noqa: S101 - set by the first run
        still: list[str] = []
        for nodeid in failed:
            again = second.get(nodeid, [])
            if again:
                self.results[nodeid] = again
            if _failed(again) or not again:
                still.append(nodeid)
            self.timings.append(f"  {'failed again' if nodeid in still else 'passed'}: {nodeid}")
        return still

    def _suite(self, nodeids: list[str], base: Path) -> dict[str, list[dict[str, Any]]] | None:
        """One inner pytest run of ``nodeids`` (booting a new lab once if the lab dies); its reports by node id.

        None when it could not run or ended abnormally (``suite_error`` says why). Its log and results are kept when
        a test failed.
        """
        argv = [*_PYTEST, *nodeids]
        try:
            done, results, log = self._attempt(argv, base)
        except LabError as err:
            if self._closing:  # close() stopped the lab under it: the run is ending (Ctrl-C, -x)
                self.suite_error = f"the test run ended before the lab's tests did ({err})"
                return None
            if not self._lab_died(base):
                self.suite_error = f"the tests could not run in the lab: {err}"
                return None
            # The lab host itself went down (its kernel, not a test, e.g. nested KVM on emulated SVM): boot a new one
            # and run the suite once more, saying so; a second loss fails the tests.
            self.timings.append(f"the lab died during the suite ({err}; its console: {self.kept[-1]}): booted it again")
            self.timings += [f"  | {line}" for line in self._last_console[-CONSOLE_LINES:]]
            self.lab = None
            try:
                done, results, log = self._attempt(argv, base)
            except LabError as again:
                self.suite_error = f"the tests could not run in the lab (it died twice): {again}"
                return None
        reports: dict[str, list[dict[str, Any]]] = {}
        for line in results.read_text().splitlines() if results.exists() else []:
            report = json.loads(line)
            reports.setdefault(report["nodeid"], []).append(report)
        if done.ok:
            results.unlink(missing_ok=True)
            log.unlink(missing_ok=True)
        else:
            self.kept += [results, log]
        if done.status not in (0, 1):
            self.suite_error = f"pytest in the lab exited with {done.status}; its output: {log}\n{done.output[-4000:]}"
            return None
        return reports

    def _attempt(self, argv: list[str], base: Path) -> tuple[LabResult, Path, Path]:
        """Run the inner suite once; its result, its results file and its log (kept when the lab fails).

        Raises:
            LabError: The lab could not be booted or reached, or it went away during the run.
        """
        stem = base / f"run-{secrets.token_hex(4)}"
        results, log = stem.with_suffix(".jsonl"), stem.with_suffix(".log")
        try:
            lab = self.ensure()
            started = time.monotonic()
            with log.open("wb") as echo:
                done = lab.run(
                    argv,
                    cwd=self.config.rootpath,
                    env={**os.environ, RESULTS_ENV: str(results)},
                    timeout=SUITE_TIMEOUT,
                    echo=echo,
                )
        except LabError:
            self.kept.append(log)
            raise
        elapsed = time.monotonic() - started
        tests = len(argv) - len(_PYTEST)
        self.timings.append(f"lab suite: {tests} tests in {elapsed:.1f} s (pytest exit {done.status})")
        return done, results, log

    def _lab_died(self, base: Path) -> bool:
        """Whether the lab this run used is gone, as opposed to a lab that is up and failed us.

        Gone is: its QEMU ended, or its agent answers nothing for ``PROBE_SECONDS`` (then it is stopped). The lab's
        console is kept in ``base`` first, since a new lab writes over it.
        """
        if self.lab is None or self.lab.answers(within=PROBE_SECONDS):
            return False
        console = base / f"lab-console-{secrets.token_hex(4)}.log"
        with contextlib.suppress(OSError):
            console.write_bytes((self.lab.directory / "console.log").read_bytes())
        self.kept.append(console)
        self._last_console = self.lab.console_tail(CONSOLE_LINES).splitlines()
        if Lab.find(self.lab.directory) is not None:  # up but answering nothing: end it before booting another
            with contextlib.suppress(LabError, OSError):
                self.lab.stop()
        return True

    def close(self) -> None:
        """Stop the lab if this run booted it; an inner run still going (after Ctrl-C, ``-x``) ends with it.

        A boot under way is waited for (then stopped), and none starts after this.
        """
        with self._booting:
            self._closing = True
            lab = self.lab
        if lab is not None and lab.booted_here:
            lab.stop()
        if self._runner is not None:
            self._runner.join(timeout=PROBE_SECONDS)


def _failed(reports: list[dict[str, Any]]) -> bool:
    return any(report["outcome"] == "failed" for report in reports)


def _slowest(results: dict[str, list[dict[str, Any]]], most: int = SLOWEST) -> list[str]:
    """The lab tests that took longest (set-up, call and teardown together): where the lab suite's time goes."""
    totals = {nodeid: sum(report["duration"] for report in reports) for nodeid, reports in results.items()}
    ranked = sorted(totals.items(), key=lambda item: item[1], reverse=True)[:most]
    return [f"  {seconds:7.1f} s  {nodeid}" for nodeid, seconds in ranked]


class LabItem(pytest.Item):
    """Stands in for a ``qmpnet_lab`` test outside the lab: reports the outcome of the same test run inside."""

    def runtest(self) -> None:
        """Report the inner test's outcome as this item's."""
        reports = self.config.stash[_SESSION].result(self.nodeid)
        if not reports:
            pytest.fail(f"{self.nodeid} did not run in the lab (see the lab suite's log)", pytrace=False)
        failed = [r for r in reports if r["outcome"] == "failed"]
        if failed:
            text = "\n\n".join(f"--- in the lab, {r['when']}:\n{r['longrepr']}" for r in failed)
            captured = "\n".join(f"--- {title}\n{content}" for r in failed for title, content in r["sections"])
            pytest.fail(f"{text}\n{captured}".rstrip(), pytrace=False)
        skipped = [r for r in reports if r["outcome"] == "skipped"]
        if skipped:
            pytest.skip(f"in the lab: {skipped[0]['longrepr']}")
        call = next((r for r in reports if r["when"] == "call"), None)
        if call is not None:
            self.user_properties.append(("lab_duration", call["duration"]))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        """Where the test is, marked as run in the lab."""
        return self.path, None, f"{self.name} (in the lab)"


# --- hooks (imported by qmpnet.testguest.plugin) --------------------------------------------------------------------


def lab_configure(config: pytest.Config) -> None:
    """Register the marker and the run's lab session."""
    config.addinivalue_line("markers", f"{LAB_MARKER}: runs inside the lab host (qmpnet.testguest.lab)")
    config.stash[_SESSION] = LabSession(config)


def lab_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Outside the lab, replace each ``qmpnet_lab`` test by a :class:`LabItem` with the same node id."""
    if inside_lab():
        return
    for index, item in enumerate(items):
        if item.get_closest_marker(LAB_MARKER) is None or isinstance(item, LabItem):
            continue
        stand_in = LabItem.from_parent(item.parent, name=item.name)  # type: ignore[arg-type]
        stand_in.own_markers = list(item.own_markers)
        stand_in.keywords.update(item.keywords)
        items[index] = stand_in


def lab_collection_finish(session: pytest.Session) -> None:
    """Move the stand-ins left after deselection to the end of the run, and start their inner run now.

    The inner run needs nothing from this run's other tests; they run here meanwhile, and the stand-ins wait for its
    end. The tests that use the lab themselves (the ``qmpnet_lab`` fixture) come after the stand-ins, on a lab the
    inner run is done with: a command of theirs beside it (``modprobe``, a netem qdisc, a bridge in the lab's root
    namespace) once left both of the lab's CPUs in a soft lockup. Not for ``--collect-only``, which runs nothing.
    """
    if inside_lab():
        return
    stand_ins: list[pytest.Item] = [item for item in session.items if isinstance(item, LabItem)]
    if not stand_ins:
        return
    others: list[pytest.Item] = []
    users: list[pytest.Item] = []
    for item in session.items:
        if not isinstance(item, LabItem):
            (users if "qmpnet_lab" in getattr(item, "fixturenames", ()) else others).append(item)
    session.items[:] = others + stand_ins + users
    lab = session.config.stash[_SESSION]
    lab.nodeids = [item.nodeid for item in stand_ins]
    if not session.config.option.collectonly:
        lab.start()


def lab_runtest_logreport(report: pytest.TestReport) -> None:
    """Inside the lab, append each report to ``$QMPNET_LAB_RESULTS`` (for the stand-ins outside)."""
    target = os.environ.get(RESULTS_ENV)
    if not target or not inside_lab():
        return
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else report.longreprtext
    record = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "duration": round(report.duration, 2),
        "longrepr": text,
        "sections": [list(section) for section in report.sections],
    }
    with Path(target).open("a") as out:
        out.write(json.dumps(record) + "\n")


def lab_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:  # noqa: ANN401 - pytest's type is private
    """Print the lab's boot and suite timings, and where a failed run's files were kept."""
    session = config.stash.get(_SESSION, None)
    if session is None or not (session.timings or session.kept):
        return
    terminalreporter.section("qmpnet lab")
    for line in session.timings:
        terminalreporter.write_line(line)
    for path in session.kept:
        terminalreporter.write_line(f"kept: {path}")


def lab_unconfigure(config: pytest.Config) -> None:
    """Stop the lab this run booted."""
    session = config.stash.get(_SESSION, None)
    if session is not None:
        session.close()


@pytest.fixture(scope="session")
def qmpnet_lab(pytestconfig: pytest.Config) -> Lab:
    """The lab host, shared by the whole run and stopped after it if the run booted it (see the module).

    Handed out once the inner run of the lab's tests has ended (its tests come first; see ``lab_collection_finish``).
    """
    try:
        return pytestconfig.stash[_SESSION].ensure(after_inner_run=True)
    except LabError as err:
        pytest.fail(str(err), pytrace=False)
