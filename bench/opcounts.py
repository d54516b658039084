"""Count the bytecodes each Python function of a process runs, between SIGUSR1 and SIGUSR2: a profile that the
machine's load does not change (``serve_counts.py --tool opcodes`` runs ``qmpnet serve`` under it).

Run: ``python bench/opcounts.py OUT -m qmpnet serve ...`` (the rest is the command, as ``python`` takes it). SIGUSR1
starts counting in every thread (``sys.settrace`` with opcode events: ~50x slower while on), SIGUSR2 stops and
writes OUT (JSON: the total, and by function its own bytecodes, the bytecodes while it ran, callees included, and
how often it was entered, a coroutine's every resumption counted). ``python bench/opcounts.py --report OUT N``
prints them per unit of work (N: how many units were counted), by module and by function.

C code is not in the counts (pydantic-core, json's scanner, the system calls): callgrind's instruction counts give
the whole, these where the Python of it goes.
"""

from __future__ import annotations

import collections
import json
import runpy
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import CodeType, FrameType

_SITE = ("/site-packages/", "/lib/python3")


class Counts:
    """Bytecodes by function while on."""

    def __init__(self) -> None:
        self.total = 0
        self.own: collections.Counter[CodeType] = collections.Counter()
        self.within: collections.Counter[CodeType] = collections.Counter()
        self.entered: collections.Counter[CodeType] = collections.Counter()
        self._starts: dict[int, int] = {}

    def trace(self, frame: FrameType, event: str, _arg: object) -> Any:  # noqa: ANN401 - sys.settrace's protocol
        if event == "opcode":
            self.total += 1
            self.own[frame.f_code] += 1
        elif event == "call":
            frame.f_trace_opcodes = True
            self._starts[id(frame)] = self.total
            self.entered[frame.f_code] += 1
        elif event == "return":
            start = self._starts.pop(id(frame), None)
            if start is not None:
                self.within[frame.f_code] += self.total - start
        return self.trace

    def start(self) -> None:
        threading.settrace(self.trace)
        sys.settrace(self.trace)

    def stop(self, out: Path) -> None:
        sys.settrace(None)
        threading.settrace(None)

        def named(counter: collections.Counter[CodeType]) -> dict[str, int]:
            return {f"{c.co_filename}:{c.co_firstlineno}({c.co_qualname})": n for c, n in counter.items()}

        data = {"total": self.total, "own": named(self.own), "within": named(self.within),
                "entered": named(self.entered)}  # fmt: skip
        out.write_text(json.dumps(data))


def _short(name: str) -> str:
    for marker in _SITE:
        _, found, tail = name.partition(marker)
        if found:
            return tail.split("/", 1)[-1] if marker == "/lib/python3" else tail
    return name.split("/qmpnet/", 1)[-1] if "/qmpnet/" in name else name


def report(path: Path, units: float, top: int = 30) -> None:
    """Print the counts of ``path`` per unit: by module, then the functions by own and by inclusive bytecodes."""
    data = json.loads(path.read_text())
    total = data["total"]
    print(f"{total / units:.0f} bytecodes per unit")
    modules: collections.Counter[str] = collections.Counter()
    for name, n in data["own"].items():
        modules[_short(name.split(":", 1)[0])] += n
    print("\nby module (own bytecodes per unit, share)")
    for module, n in modules.most_common(top):
        print(f"{n / units:9.0f} {n / total:6.1%}  {module}")
    for title, key in (("own", "own"), ("callees included", "within")):
        print(f"\nby function, {title} (bytecodes per unit, entries per unit)")
        for name, n in collections.Counter(data[key]).most_common(top):
            print(f"{n / units:9.0f} {data['entered'].get(name, 0) / units:7.1f}  {_short(name)}")


def main() -> None:
    if sys.argv[1:2] == ["--report"]:
        report(Path(sys.argv[2]), float(sys.argv[3]))
        return
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    counts = Counts()
    signal.signal(signal.SIGUSR1, lambda *_: counts.start())
    signal.signal(signal.SIGUSR2, lambda *_: counts.stop(out))
    if rest[:1] != ["-m"] or len(rest) < 2:
        sys.exit("usage: opcounts.py OUT -m MODULE [ARGS...] | opcounts.py --report OUT UNITS")
    sys.argv = [rest[1], *rest[2:]]
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
