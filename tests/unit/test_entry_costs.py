"""What keeps the entry points cheap, checked by what is imported and asked, never by a timing (docs/performance.md).

The figures themselves are the benchmarks' (``bench/``); these tests keep the structure that makes them possible:
``qmpnet --help`` loads none of the lane, a lane that never touches a tap does not load pyroute2, readers of one
QEMU binary share its type facts, the controller raises its open-file limit, and the bench scripts still parse
their arguments and the QMP endpoint simulator still answers everything the lane asks.
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import needs
import pytest
from captures import Capture, observe
from waiting import eventually

from qmpnet.adapters.qmp.reader import GuestReader

if TYPE_CHECKING:
    from collections.abc import Mapping

ROOT = Path(__file__).parents[2]
BENCH = ROOT / "bench"


def imported_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_help_loads_no_model_no_lane_no_netlink() -> None:
    modules = imported_after(
        "import contextlib, io\n"
        "from qmpnet.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])"
    )
    for heavy in ("pydantic", "pydantic_settings", "pyroute2", "qemu", "aiomqtt", "rich", "qmpnet.core.model",
                  "qmpnet.guest.guest", "qmpnet.settings", "qmpnet.api.wire.envelopes"):  # fmt: skip
        assert heavy not in modules, f"`qmpnet --help` imports {heavy}"


def test_a_command_loads_no_other_command() -> None:
    modules = imported_after(
        "import contextlib, io\n"
        "from qmpnet.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stderr(io.StringIO()):\n"
        "    main(['nic', 'add', '--model', 'foo', '--qmp', '/nobody.qmp'])"
    )
    assert "qmpnet.cli.nic" in modules
    for other in ("qmpnet.cli.serve", "qmpnet.cli.apply", "qmpnet.cli.net", "qmpnet.cli.models", "qmpnet.cli.schema"):
        assert other not in modules, f"`qmpnet nic add` imports {other}"


def test_direct_mode_builds_no_model_it_never_validates() -> None:
    # A model pydantic builds at import costs a new process ~1 M instructions a field; the ones a direct-mode
    # command never validates are built on their first use (model_base.BUILT_ON_FIRST_USE).
    script = (
        "import json, qmpnet.api.direct, qmpnet.core.model as m\n"
        "print(json.dumps({n: getattr(m, n).__pydantic_complete__ for n in m.__all__\n"
        "                  if hasattr(getattr(m, n), '__pydantic_complete__')}))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    built = json.loads(done.stdout)
    on_first_use = {"GuestView", "RemoveResult", "ModelInfo", "DiscardedRecord", "GuestEvent", "CaptureResult",
                    "BusCapacity", "ModelCapacity", "Capacity", "NicUpdate"}  # fmt: skip
    assert {name for name, complete in built.items() if not complete} == on_first_use
    from qmpnet.core.model import Capacity, RemoveResult  # noqa: PLC0415 - the deferred models are the subject

    assert RemoveResult(id="virtio0", state="removed").state == "removed"
    assert Capacity.model_validate({"machine": "pc", "models": []}).machine == "pc"


def test_the_models_of_a_command_are_cheap_to_build() -> None:
    # pydantic reads each default factory's signature; list's is parsed with tokenize (~14 M instructions for the
    # first in a process): the models every command builds use model_base.empty_list instead.
    import pydantic  # noqa: PLC0415 - as above

    import qmpnet.core.model  # noqa: PLC0415
    import qmpnet.core.records  # noqa: PLC0415
    import qmpnet.settings  # noqa: PLC0415, F401 - its models are the subject

    def models(base: type[pydantic.BaseModel]) -> list[type[pydantic.BaseModel]]:
        return [m for sub in base.__subclasses__() for m in (sub, *models(sub))]

    ours = [m for m in models(pydantic.BaseModel) if m.__module__.startswith(("qmpnet.core.", "qmpnet.settings"))]
    assert len(ours) > 40
    for model in ours:
        for name, info in model.model_fields.items():
            assert info.default_factory not in (list, tuple), f"{model.__name__}.{name}: default_factory=empty_list"
        # And their annotations are objects, not strings pydantic would compile (no `from __future__ import
        # annotations` in the modules of many fields; ~70 k instructions a field).
        if model.__module__ not in ("qmpnet.core.model_base", "qmpnet.core.nic_filter"):
            strings = [name for name, hint in vars(model).get("__annotations__", {}).items() if isinstance(hint, str)]
            assert not strings, f"{model.__module__}.{model.__name__}: string annotations {strings}"


def test_direct_mode_and_the_host_object_load_no_netlink() -> None:
    modules = imported_after(
        "import qmpnet, qmpnet.api.direct, qmpnet.serve.compose\n"
        "from qmpnet.adapters.hostnet.host import HostNet\n"
        "HostNet()\n"
        "qmpnet.connect, qmpnet.Guest, qmpnet.NicSpec"
    )
    assert "pyroute2" not in modules
    assert "qmpnet.adapters.hostnet.taps" not in modules
    # The guest agent's client and reply models load only for a call that talks to the agent (issue 17).
    assert "qmpnet.adapters.qga.client" not in modules
    # Nor the live update's runner and the vfio sysfs code: a hot-add does not use them.
    assert "qmpnet.guest.update" not in modules
    assert "qmpnet.adapters.hostnet.vfio" not in modules


def test_a_filter_sweep_with_nothing_filtered_loads_no_netlink(tmp_path: Path) -> None:
    # Every connect sweeps the anti-spoofing rules of gone taps (recovery); with no rules anywhere, the usual case,
    # the sweep asks nft and stops: netlink (pyroute2, ~70 ms to import) is not loaded to list the links.
    nft = tmp_path / "nft"
    nft.write_text("#!/bin/sh\necho '{\"nftables\": []}'\n")
    nft.chmod(0o755)
    modules = imported_after(
        "import asyncio\n"
        "from qmpnet.adapters.hostnet.host import HostNet, HostnetSettings\n"
        f"assert asyncio.run(HostNet(HostnetSettings(nft={str(nft)!r})).sweep_filters()) == []"
    )
    assert "pyroute2" not in modules


def test_the_public_names_still_resolve() -> None:
    import qmpnet  # noqa: PLC0415 - the lazy attributes are the subject

    for name in qmpnet.__all__:
        assert getattr(qmpnet, name) is not None
    from qmpnet.adapters.hostnet import HostnetSettings, create_tap, net_up  # noqa: PLC0415 - as above

    assert callable(create_tap)
    assert callable(net_up)
    assert HostnetSettings().tap_pattern
    from qmpnet.adapters.qga import WANTS, GuestAgent, find_agent_socket  # noqa: PLC0415 - as above

    assert callable(find_agent_socket)
    assert callable(GuestAgent.open)
    assert "address" in WANTS
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        qmpnet.nothing  # noqa: B018 - the access is the test


def test_the_sweep_prefixes_are_the_marks_links_writes() -> None:
    from qmpnet.adapters.hostnet.host import IFB_MARK_PREFIX, TAP_MARK_PREFIX  # noqa: PLC0415 - as above
    from qmpnet.adapters.hostnet.links import ifb_mark, tap_mark  # noqa: PLC0415 - pyroute2 is fine in a test

    assert tap_mark("vm1/virtio0").startswith(TAP_MARK_PREFIX)
    assert tap_mark("vm1/virtio0") == TAP_MARK_PREFIX + "vm1/virtio0"
    assert ifb_mark(7, "vnet0").startswith(IFB_MARK_PREFIX)


class Counting:
    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.sent: list[str] = []

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        self.sent.append(command)
        return await self.capture.execute(command, arguments)


def test_readers_of_one_binary_read_its_types_once() -> None:
    first, second, other = (Counting(Capture.load("7.2", "pc")) for _ in range(3))
    readers = [GuestReader(c.execute, attempts=3) for c in (first, second, other)]
    readers[0].share_types(("test binary", 1))
    readers[1].share_types(("test binary", 1))
    readers[2].share_types(("test binary", 2))
    observations = [observe(c.capture, r) for c, r in zip((first, second, other), readers, strict=True)]
    assert observations[0] == observations[1] == observations[2]
    type_commands = {"qom-list-types", "device-list-properties"}
    assert type_commands <= set(first.sent)
    assert type_commands.isdisjoint(second.sent), "the second connection to the binary asked for its types again"
    assert type_commands <= set(other.sent), "another binary's types were taken for this one's"


def test_the_controller_raises_its_open_file_limit() -> None:
    from qmpnet.serve.compose import raise_open_file_limit  # noqa: PLC0415 - as above

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = before
    needs.require(hard > 64, f"needs a hard open-file limit above 64 (it is {hard}) to lower the soft one")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        assert raise_open_file_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_systemd_unit_sets_the_open_file_limit() -> None:
    unit = (ROOT / "contrib" / "systemd" / "qmpnet.service").read_text()
    limit = next(line for line in unit.splitlines() if line.startswith("LimitNOFILE="))
    assert int(limit.partition("=")[2]) >= 16384


@pytest.mark.parametrize("script", ["hotplug.py", "mqtt_hotplug.py", "scale.py", "hotadd_counts.py", "serve_counts.py"])
def test_a_bench_script_parses_its_arguments(script: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True,
                          check=False, timeout=60, cwd=BENCH)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


async def test_the_simulator_answers_everything_a_lane_asks(tmp_path: Path) -> None:
    import qmpnet  # noqa: PLC0415 - as above

    sim = tmp_path / "sim"
    ready = tmp_path / "ready"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH / "qmpsim.py"), "--dir", str(sim), "--count", "2", "--ready", str(ready),
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:

        def simulator_ready() -> bool:
            assert proc.returncode is None, "the simulator exited"
            return ready.exists()  # the simulator says it is ready with this file

        await eventually(simulator_ready, timeout=30, interval=0.02, what="the simulator's ready file")
        settings = qmpnet.Settings(state_dir=tmp_path / "state")
        async with qmpnet.connect(str(sim / "g0.qmp"), settings=settings) as guest:
            before = {nic.id for nic in await guest.list_nics()}
            nic = await guest.add_nic({"model": "virtio"})
            after = {n.id for n in await guest.list_nics()}
        assert after == before | {nic.id}
        assert before == {"e1", "v1", "rtl8139.0"}  # the captured guest's own NICs
    finally:
        proc.terminate()
        await proc.wait()


def test_a_record_file_is_the_document_pydantic_writes() -> None:
    import json  # noqa: PLC0415 - as above
    import time  # noqa: PLC0415 - as above

    from qmpnet.adapters.store.encoding import encode_record  # noqa: PLC0415 - as above
    from qmpnet.core.model import parse_nic_spec  # noqa: PLC0415 - as above
    from qmpnet.core.records import DesiredSet, GuestRecord, NicRecord, OperationRecord  # noqa: PLC0415 - as above

    record = GuestRecord(address="/run/vm1.qmp", name="vm1", links={"e1": "down"}, gone={"old": 1.5})
    assert json.loads(encode_record(record)) == json.loads(record.model_dump_json())
    for n in range(5):
        spec = parse_nic_spec({"model": "virtio", "id": f"v{n}", "mac": f"52:54:00:00:00:0{n}", "addr": f"{n + 3:x}"})
        record = record.with_nic(NicRecord(id=f"v{n}", spec=spec, netdev=f"v{n}.net", state="active", link="up"))
        outcome = {"status": "ok", "data": {"id": f"v{n}", "odd": ['"quoted"', "é", 2.5, None]}}
        record = record.with_operation(OperationRecord(id=f'op "{n}"', op="nic/add", nic=f"v{n}", started=time.time(),
                                                       finished=time.time(), outcome=outcome))  # fmt: skip
        desired = DesiredSet(generation=n, nics=[nic.spec for nic in record.nics.values() if nic.spec is not None])
        record = record.model_copy(update={"desired": desired})
        written = encode_record(record)  # twice: the second time from the cached parts
        assert encode_record(record) == written
        assert json.loads(written) == json.loads(record.model_dump_json())
        assert GuestRecord.model_validate_json(written) == record


