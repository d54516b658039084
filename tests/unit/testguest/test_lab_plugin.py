"""The lab plugin's one retry: a lab that died during the inner suite is booted again, a lab that is up is not.

The labs here are stand-ins (booting two real labs and killing one costs minutes); tests/unit/testguest/
test_lab_host.py tests how a real :class:`~qmpnet.testguest.lab.Lab` tells the two apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest

from qmpnet.testguest import lab as lab_module
from qmpnet.testguest import labplugin
from qmpnet.testguest.lab import LabError, LabResult
from qmpnet.testguest.labplugin import RESULTS_ENV, LabSession

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

NODE = "tests/integration/test_x.py::test_y"


class _FakeLab:
    """A lab that either drops the suite's connection (``dies``) or runs it and reports one passed test."""

    def __init__(
        self, directory: Path, *, dies: bool, up_after_drop: bool, outcomes: list[str] | None = None
    ) -> None:
        self.directory = directory
        self.dies = dies
        self.outcomes = outcomes or ["passed"]  # one per run, for every test it is given
        self.runs: list[list[str]] = []
        self.up_after_drop = up_after_drop
        self.booted_here = True
        self.stopped = False
        self.state = SimpleNamespace(boot_seconds=1.0, pid=os.getpid())
        (directory / "console.log").write_text("lab: agent listening\nKernel panic - not syncing: Fatal exception\n")

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **_: object) -> LabResult:
        """As ``Lab.run``; the other keywords (cwd, timeout, echo) mean nothing here."""
        if self.dies:
            raise LabError("the lab's agent closed the connection without an answer")
        assert env is not None
        nodeids = [arg for arg in argv if "::" in arg]
        self.runs.append(nodeids)
        outcome = self.outcomes[len(self.runs) - 1]
        with Path(env[RESULTS_ENV]).open("w") as out:
            for nodeid in nodeids:
                record = {"nodeid": nodeid, "when": "call", "outcome": outcome, "duration": 1.0,
                          "longrepr": "" if outcome == "passed" else "guest reset", "sections": []}  # fmt: skip
                out.write(json.dumps(record) + "\n")
        return LabResult(status=0 if outcome == "passed" else 1, output=outcome)

    def answers(self, within: float) -> bool:
        del within
        return self.up_after_drop

    def console_tail(self, lines: int) -> str:
        return "\n".join((self.directory / "console.log").read_text().splitlines()[-lines:])

    def stop(self) -> None:
        self.stopped = True


def _session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, labs: list[_FakeLab]) -> LabSession:
    queue = list(labs)

    def ensure(**_: Any) -> _FakeLab:
        return queue.pop(0)

    monkeypatch.setattr(lab_module.Lab, "ensure", staticmethod(ensure))
    monkeypatch.setattr(lab_module.Lab, "find", staticmethod(lambda _directory: None))
    session = LabSession(SimpleNamespace(rootpath=tmp_path))  # type: ignore[arg-type]
    session.nodeids.append(NODE)
    return session


def test_a_lab_that_died_during_the_suite_is_booted_again_and_the_suite_runs_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dead = _FakeLab(tmp_path / "a", dies=True, up_after_drop=False)
    session = _session(tmp_path, monkeypatch, [dead, _FakeLab(tmp_path / "b", dies=False, up_after_drop=True)])
    [report] = session.result(NODE)
    assert report["outcome"] == "passed"
    assert session.suite_error is None
    said = "\n".join(session.timings)
    assert "the lab died during the suite (the lab's agent closed the connection without an answer" in said
    assert "| Kernel panic - not syncing: Fatal exception" in said  # the dead lab's console, in the summary
    [console] = [path for path in session.kept if path.name.startswith("lab-console-")]
    assert "Kernel panic" in console.read_text()  # kept: the new lab writes over its console.log


def test_a_lab_that_is_still_up_after_a_lost_connection_fails_the_tests_without_a_second_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = _FakeLab(tmp_path, dies=True, up_after_drop=True)
    session = _session(tmp_path, monkeypatch, [up])  # a second ensure() would find the queue empty
    with pytest.raises(pytest.fail.Exception, match="could not run in the lab: the lab's agent closed"):
        session.result(NODE)
    assert not any("died" in line for line in session.timings)
    assert not up.stopped


def test_a_lab_that_dies_twice_fails_the_tests_saying_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labs = [_FakeLab(tmp_path, dies=True, up_after_drop=False) for _ in range(2)]
    session = _session(tmp_path, monkeypatch, labs)
    with pytest.raises(pytest.fail.Exception, match=r"it died twice"):
        session.result(NODE)


def test_a_lab_that_is_running_but_answers_nothing_is_stopped_before_the_next_boots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    wedged = _FakeLab(tmp_path / "a", dies=True, up_after_drop=False)
    session = _session(tmp_path, monkeypatch, [wedged, _FakeLab(tmp_path, dies=False, up_after_drop=True)])
    monkeypatch.setattr(lab_module.Lab, "find", staticmethod(lambda _directory: wedged))  # its QEMU still runs
    [report] = session.result(NODE)
    assert report["outcome"] == "passed"
    assert wedged.stopped


def _many(session: LabSession, count: int) -> list[str]:
    nodeids = [f"{NODE}{n}" for n in range(count)]
    session.nodeids[:] = nodeids
    return nodeids


def test_a_failed_lab_test_is_run_again_in_a_new_pytest_and_the_summary_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = _FakeLab(tmp_path, dies=False, up_after_drop=True, outcomes=["failed", "passed"])
    session = _session(tmp_path, monkeypatch, [lab])
    [report] = session.result(NODE)
    assert report["outcome"] == "passed"
    assert lab.runs == [[NODE], [NODE]]
    said = "\n".join(session.timings)
    assert "1 lab test(s) failed and were run again in a new pytest" in said
    assert f"passed: {NODE}" in said
    assert any(path.suffix == ".log" for path in session.kept)  # the first run's log, with its failure


def test_a_lab_test_is_run_again_up_to_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = _FakeLab(tmp_path, dies=False, up_after_drop=True, outcomes=["failed", "failed", "passed"])
    session = _session(tmp_path, monkeypatch, [lab])
    [report] = session.result(NODE)
    assert report["outcome"] == "passed"
    assert lab.runs == [[NODE], [NODE], [NODE]]
    said = "\n".join(session.timings)
    assert said.count("lab suite: 1 tests in") == 3  # each run's own count
    assert f"failed again: {NODE}" in said
    assert f"passed: {NODE}" in said


def test_a_lab_test_that_fails_every_time_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = _FakeLab(tmp_path, dies=False, up_after_drop=True, outcomes=["failed"] * (1 + labplugin.RERUNS))
    session = _session(tmp_path, monkeypatch, [lab])
    [report] = session.result(NODE)
    assert report["outcome"] == "failed"
    assert len(lab.runs) == 1 + labplugin.RERUNS
    assert "\n".join(session.timings).count(f"failed again: {NODE}") == labplugin.RERUNS


def test_many_failed_lab_tests_are_not_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = _FakeLab(tmp_path, dies=False, up_after_drop=True, outcomes=["failed"])
    session = _session(tmp_path, monkeypatch, [lab])
    nodeids = _many(session, labplugin.RERUN_MOST + 1)
    assert all(report["outcome"] == "failed" for nodeid in nodeids for report in session.result(nodeid))
    assert len(lab.runs) == 1
    assert not any("run again" in line for line in session.timings)


def test_only_the_failed_tests_are_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = _FakeLab(tmp_path, dies=False, up_after_drop=True, outcomes=["failed", "passed"])
    session = _session(tmp_path, monkeypatch, [lab])
    nodeids = _many(session, 2)
    original = lab.run

    def first_passes_one(argv: Sequence[str], **kwargs: Any) -> LabResult:
        result = original(argv, **kwargs)
        if len(lab.runs) == 1:  # the first run: the first test passed, the second failed
            env = kwargs["env"]
            lines = Path(env[RESULTS_ENV]).read_text().splitlines()
            Path(env[RESULTS_ENV]).write_text(lines[0].replace('"failed"', '"passed"') + "\n" + lines[1] + "\n")
        return result

    monkeypatch.setattr(lab, "run", first_passes_one)
    assert [r["outcome"] for nodeid in nodeids for r in session.result(nodeid)] == ["passed", "passed"]
    assert lab.runs == [nodeids, nodeids[1:]]


# ------------------------------------------------------------------------------- the inner run beside the others


def test_the_inner_run_goes_on_in_a_thread_and_a_stand_in_waits_for_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = _FakeLab(tmp_path, dies=False, up_after_drop=True)
    session = _session(tmp_path, monkeypatch, [lab])
    entered, release = threading.Event(), threading.Event()
    original = lab.run

    def held(argv: Sequence[str], **kwargs: Any) -> LabResult:
        entered.set()
        assert release.wait(30), "never released"
        return original(argv, **kwargs)

    monkeypatch.setattr(lab, "run", held)
    session.start()
    assert entered.wait(30), "the inner run did not start"
    assert threading.current_thread() is threading.main_thread()  # start() came back while the run is held
    assert session.results == {}  # begun, not ended
    session.start()  # a second start is no second run
    release.set()
    [report] = session.result(NODE)
    assert report["outcome"] == "passed"
    assert lab.runs == [[NODE]]


def test_an_unexpected_error_in_the_inner_runs_thread_fails_every_stand_in_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = _FakeLab(tmp_path, dies=False, up_after_drop=True)
    session = _session(tmp_path, monkeypatch, [lab])

    def broken(argv: Sequence[str], **kwargs: Any) -> LabResult:
        raise RuntimeError("the results file vanished")

    monkeypatch.setattr(lab, "run", broken)
    session.start()
    for _ in range(2):
        with pytest.raises(pytest.fail.Exception, match="thread failed: RuntimeError: the results file vanished"):
            session.result(NODE)


def test_the_lab_fixture_is_handed_out_once_the_inner_run_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = _FakeLab(tmp_path, dies=False, up_after_drop=True)
    session = _session(tmp_path, monkeypatch, [lab])
    release = threading.Event()
    original = lab.run

    def held(argv: Sequence[str], **kwargs: Any) -> LabResult:
        assert release.wait(30), "never released"
        return original(argv, **kwargs)

    monkeypatch.setattr(lab, "run", held)
    session.start()
    handed: list[object] = []
    asker = threading.Thread(target=lambda: handed.append(session.ensure(after_inner_run=True)))
    asker.start()
    asker.join(0.5)  # a bounded look: it must still be waiting while the inner run is held
    assert asker.is_alive()
    assert handed == []
    release.set()
    asker.join(30)
    assert handed == [lab]
    assert session.results is not None
    assert lab.runs == [[NODE]]


def test_a_session_with_no_lab_test_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = _session(tmp_path, monkeypatch, [])  # ensure() would find the queue empty
    session.nodeids.clear()
    session.start()
    assert session.results is None
    session.close()


def _collect(tmp_path: Path, *args: str) -> list[str]:
    """The node ids a pytest run of a small module would run, in order (``--collect-only``: nothing runs)."""
    (tmp_path / "test_mixed.py").write_text(
        "import pytest\n\n"
        "def test_uses_lab_e(qmpnet_lab): pass\n\n"
        "@pytest.mark.qmpnet_lab\ndef test_in_lab_a(): pass\n\n"
        "def test_here_b(): pass\n\n"
        "@pytest.mark.qmpnet_lab\ndef test_in_lab_c(): pass\n\n"
        "def test_here_d(): pass\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "QMPNET_LAB"}
    env["QMPNET_LAB_DIR"] = str(tmp_path / "labdir")  # a lab booted or looked for would leave its state here
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", "--rootdir", str(tmp_path),
         *args, str(tmp_path / "test_mixed.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return [line.split("::")[1] for line in done.stdout.splitlines() if "::" in line]


def test_stand_ins_run_after_the_other_tests_then_the_tests_that_use_the_lab_and_collecting_boots_no_lab(
    tmp_path: Path,
) -> None:
    everything = ["test_here_b", "test_here_d", "test_in_lab_a", "test_in_lab_c", "test_uses_lab_e"]
    assert _collect(tmp_path) == everything
    assert _collect(tmp_path, "-k", "not test_in_lab_a") == [name for name in everything if name != "test_in_lab_a"]
    assert not (tmp_path / "labdir").exists()


def test_closing_the_run_stops_the_lab_under_the_inner_run_and_boots_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = _FakeLab(tmp_path, dies=False, up_after_drop=False)
    session = _session(tmp_path, monkeypatch, [lab])  # a second ensure() would find the queue empty
    entered, stopped = threading.Event(), threading.Event()

    def until_stopped(argv: Sequence[str], **kwargs: Any) -> LabResult:
        entered.set()
        assert stopped.wait(30), "never stopped"
        raise LabError("the lab's agent closed the connection without an answer")

    monkeypatch.setattr(lab, "run", until_stopped)
    monkeypatch.setattr(lab, "stop", stopped.set)
    session.start()
    assert entered.wait(30), "the inner run did not start"
    session.close()  # as pytest_unconfigure after Ctrl-C
    assert stopped.is_set()
    with pytest.raises(pytest.fail.Exception, match="the test run ended before the lab's tests did"):
        session.result(NODE)
    assert not any("died" in line for line in session.timings)
