"""The quick path: ``qmpnet nic add|del|link|set|list --qmp SOCKET`` answered by the controller on this host.

When ``qmpnet serve`` holds a guest's monitor, a ``nic`` command with ``--qmp`` is the controller's to answer
(:mod:`qmpnet.serve.control_socket`), which validates, plans and checks its policy itself. So the command need not
load what checking it locally would: typer and its per-option adapters, pydantic, the models and the settings,
asyncio (~60% of a direct-mode ``nic add``; docs/performance.md). :func:`attempt` parses the command line with the
flag tables the full command line gives typer (:mod:`.nic_flags`), sends the controller one request line and prints
its answer as the full command line would: the same JSON, the same table, the same ``error:`` line and status.

It answers only what it can answer exactly as the full command line would, and gives everything else back
(``None``) before anything is sent that could change the guest:

* anything but ``nic add|del|link|set|list`` with ``--qmp``, a ``--help``, ``--config``, ``--verbose``, broker-mode
  options or ``--qga``; an option, value or argument it does not know (the full command line's parser words the
  usage error);
* a ``QMPNET_...`` variable that sets one of the settings but the state directory (the full command line validates
  them and its timeouts come from them);
* no control socket, no controller listening on it, or a controller that does not serve the guest: the full
  command line then connects to QEMU itself (direct mode);
* the controller's ``invalid_request``: nothing was changed, and the full command line checks the input itself and
  words the error as it always has (a refusal of the controller's own policy is then the controller's answer again).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import typing
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeGuard

from qmpnet.cli.flags import Flag, Given, LinkArg, flag_table
from qmpnet.cli.nic_flags import ADD_FLAGS, SET_FLAGS, build_spec, build_update
from qmpnet.cli.output import one_line
from qmpnet.cli.tables import backend_line, nic_table, warning_lines
from qmpnet.errors import ErrorCode, InvalidRequest

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = ["DEFAULT_STATE_DIR", "REQUEST_TIMEOUT", "SETTINGS_FIELDS", "VERIFY_TIMEOUT", "attempt"]

#: The settings' defaults the quick path needs: a unit test checks them against :class:`qmpnet.settings.Settings`.
DEFAULT_STATE_DIR: Final = Path("/var/lib/qmpnet")
REQUEST_TIMEOUT: Final = 30.0  #: ``mqtt.request_timeout``
VERIFY_TIMEOUT: Final = 30.0  #: ``qga.verify_timeout``
#: The top-level fields of the settings: a ``QMPNET_<FIELD>`` variable (``__`` nesting) sets one of them.
SETTINGS_FIELDS: Final = frozenset({"state_dir", "boot_id_file", "qmp", "lane", "policy", "hostnet", "update",
                                    "unplug", "mqtt", "controller", "reconcile", "metrics", "log", "qga"})  # fmt: skip
#: The longest answer line the controller sends (as its control socket reads requests).
_LINE_LIMIT: Final = 256 * 1024

#: The options a quick command shares with every ``nic`` command (the guest's options, cli/options.py).
_SHARED: Final = flag_table("""
    qmp        text    --qmp        -  -
    as_json    switch  --json       -  -
    state_dir  text    --state-dir  -  -
""")
_VERIFY: Final = flag_table("verify  switch  --verify  -  -")
_VERIFY_ADDRESS: Final = flag_table("verify_address  switch  --verify-address  -  -")
_CODES: Final = frozenset(typing.get_args(ErrorCode))
#: The numbers the quick path reads itself; any other spelling is the full command line's to read or refuse.
_INTEGER: Final = re.compile(r"-?[0-9]+")
_DECIMAL: Final = re.compile(r"[0-9]+(\.[0-9]*)?")


class Command(NamedTuple):
    """A ``nic`` command the quick path answers: its op, its payload, how long it may take, how it prints."""

    op: str
    payload: dict[str, Any]
    extra_wait: float
    table: Callable[[dict[str, Any]], str]


class Parsed(NamedTuple):
    """What a command line says: its flags' values by parameter and its positional arguments."""

    values: dict[str, object]
    words: list[str]


def attempt(args: Sequence[str]) -> int | None:
    """Run ``qmpnet <args>`` through the controller on this host; its exit status, or ``None``: not answered here."""
    if len(args) < 2 or args[0] != "nic" or args[1] not in _COMMANDS:
        return None
    flags, make = _COMMANDS[args[1]]
    parsed = _parse(args[2:], flags)
    if parsed is None or not isinstance(parsed.values.get("qmp"), str) or _settings_from_environment():
        return None
    address, plain = parsed.values.pop("verify_address", False), parsed.values.pop("verify", False)
    verify: object = "address" if address else plain
    try:
        command = make(parsed, verify)
    except InvalidRequest:
        return None  # a missing or conflicting flag: the full command line words it
    if command is None:
        return None
    state_dir = parsed.values.get("state_dir") or _environment("QMPNET_STATE_DIR") or DEFAULT_STATE_DIR
    timeout = REQUEST_TIMEOUT + command.extra_wait + (VERIFY_TIMEOUT if verify else 0.0)
    return _ask(Path(str(state_dir)) / "control.sock", str(parsed.values["qmp"]), command, timeout,
                as_json=bool(parsed.values.get("as_json")))  # fmt: skip


def _parse(args: Sequence[str], flags: Sequence[Flag]) -> Parsed | None:
    """The values of ``args``, or ``None`` for anything the full command line's parser is to word.

    click's syntax: ``--opt value`` or ``--opt=value``, a switch alone, a repeated option's values in order, and
    otherwise the last one given.
    """
    known = {flag.decl: flag for flag in flags}
    values: dict[str, object] = {flag.param: flag.default for flag in flags}
    words: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("-"):
            words.append(arg)
            continue
        name, eq, text = arg.partition("=")
        flag = known.get(name)
        if flag is None:
            return None  # --help, --config, --verbose, broker mode, an unknown option, `--`
        if flag.kind is bool:
            if eq:
                return None
            values[flag.param] = True
            continue
        if not eq:
            if not rest or rest[0].startswith("-"):
                return None
            text = rest.pop(0)
        value = _typed(flag, text)
        if value is None:
            return None
        values[flag.param] = [*(values[flag.param] or ()), value] if flag.kind == list[str] | None else value  # type: ignore[misc]
    return Parsed(values, words)


def _typed(flag: Flag, text: str) -> object:
    """``text`` as the value of ``flag`` (``None``: typer may refuse it, and is to word the refusal)."""
    if flag.kind == int | None:
        return int(text) if _INTEGER.fullmatch(text) else None
    if flag.kind == float | None:
        return float(text) if _DECIMAL.fullmatch(text) else None
    choices = next((kind for kind in (flag.kind, *typing.get_args(flag.kind)) if _is_enum(kind)), None)
    if choices is not None:
        return choices._value2member_map_.get(text)  # a value typer's choice would take, or None
    return text


def _is_enum(kind: object) -> TypeGuard[type[StrEnum]]:
    return isinstance(kind, type) and issubclass(kind, StrEnum)


def _settings_from_environment() -> bool:
    """Whether a ``QMPNET_...`` variable sets one of the settings but the state directory."""
    for name in os.environ:
        upper = name.upper()
        if upper.startswith("QMPNET_"):
            field = upper.removeprefix("QMPNET_").partition("__")[0].lower()
            if field in SETTINGS_FIELDS and field != "state_dir":
                return True
    return False


def _environment(name: str) -> str | None:
    """The variable ``name``, in any case (as the settings read it)."""
    for key, value in os.environ.items():
        if key.upper() == name:
            return value
    return None


def _add(parsed: Parsed, verify: object) -> Command | None:
    if parsed.words:
        return None
    spec = build_spec(Given(parsed.values))
    return Command("nic/add", {"nic": spec, "verify": verify}, 0.0, lambda nic: nic_table([nic]) + warning_lines(nic))


def _del(parsed: Parsed, verify: object) -> Command | None:
    if len(parsed.words) != 1:
        return None
    payload: dict[str, Any] = {"id": parsed.words[0], "verify": verify}
    timeout = parsed.values["timeout"]
    if timeout is not None:
        payload["timeout"] = timeout
    return Command("nic/del", payload, float(str(timeout or 0.0)), lambda done: f"{done['id']}: {done['state']}")


def _link(parsed: Parsed, verify: object) -> Command | None:
    if len(parsed.words) != 2 or parsed.words[1] not in LinkArg.__members__:
        return None
    payload = {"id": parsed.words[0], "up": parsed.words[1] == LinkArg.up, "verify": verify}
    return Command("nic/link", payload, 0.0, lambda nic: nic_table([nic]))


def _set(parsed: Parsed, verify: object) -> Command | None:  # noqa: ARG001 - nic set takes no --verify
    if len(parsed.words) != 1:
        return None
    update = build_update(parsed.words[0], Given(parsed.values))
    return Command("nic/update", {"update": update}, 0.0,
                   lambda nic: nic_table([nic]) + backend_line(nic) + warning_lines(nic))  # fmt: skip


def _list(parsed: Parsed, verify: object) -> Command | None:  # noqa: ARG001 - nic list takes no --verify
    if parsed.words:
        return None
    return Command("nic/list", {}, 0.0, lambda listed: nic_table(listed["nics"]))


_TIMEOUT: Final = flag_table("timeout  seconds  --timeout  SECONDS  -", {"seconds": (float | None, None)})
#: The commands, with the options each takes (as the full command line's: nic.py) and how it is asked.
_COMMANDS: Final[dict[str, tuple[tuple[Flag, ...], Callable[[Parsed, object], Command | None]]]] = {
    "add": ((*ADD_FLAGS, *_SHARED, *_VERIFY, *_VERIFY_ADDRESS), _add),
    "del": ((*_TIMEOUT, *_SHARED, *_VERIFY), _del),
    "link": ((*_SHARED, *_VERIFY), _link),
    "set": ((*SET_FLAGS, *_SHARED), _set),
    "list": (_SHARED, _list),
}


def _ask(path: Path, address: str, command: Command, timeout: float, *, as_json: bool) -> int | None:
    """Send ``command`` to the controller at ``path`` and print its answer; its exit status.

    ``None``: nothing was changed, and the full command line is to run it (no controller, not this guest's, or
    input it words itself).
    """
    try:
        if not path.is_socket():
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return None
    with conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
        except OSError:
            return None  # nobody listens: direct mode
        request = {"address": address, "op": command.op, "payload": command.payload}
        try:
            conn.sendall(json.dumps(request).encode() + b"\n")
            line = _read_line(conn)
        except TimeoutError:
            return _failed("outcome_unknown", f"{command.op}: the controller on {path} did not answer within "
                                              f"{timeout:g} s")  # fmt: skip
        except OSError as err:
            return _failed("outcome_unknown", f"{command.op}: the controller on {path} went away: {err}")
    return _answered(path, command, line, as_json=as_json)


def _read_line(conn: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size <= _LINE_LIMIT:
        chunk = conn.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks)


def _answered(path: Path, command: Command, line: bytes, *, as_json: bool) -> int | None:
    if not line:
        return _failed("outcome_unknown", f"{command.op}: the controller on {path} closed the connection without "
                                          "an answer")  # fmt: skip
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return _failed("outcome_unknown", f"{command.op}: the controller on {path} sent a malformed answer")
    data = answer.get("data")
    if answer.get("status") == "ok" and isinstance(data, dict):
        print(json.dumps(data, indent=2) if as_json else command.table(data))
        return 0
    error = answer.get("error")
    body: Mapping[str, Any] = error if isinstance(error, dict) else {"message": f"malformed answer: {answer}"}
    code = str(body.get("code", "internal"))
    if code == "invalid_request" or (code == "not_found" and body.get("field") == "address"):
        return None
    # As the full command line turns the answer into an error (api.wire.envelopes.error_from): a code qmpnet does
    # not know is `internal`.
    return _failed(code if code in _CODES else "internal", str(body.get("message", "no message")))


def _failed(code: str, message: str) -> int:
    print(f"error: {code}: {one_line(message)}", file=sys.stderr)
    return 1
