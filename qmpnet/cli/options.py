"""The options several commands share, each defined once.

The enums of their choices, ``Annotated`` aliases, :func:`guest_options`, which gives a command the options
that say where its guest is and how to answer, and :func:`flag_options`, which gives a command the options of a
:func:`flag_table` (options as data, one a line) and their values as one :class:`Given`.

``--broker`` is defined once (:func:`broker_option`); its three uses differ only in their help text.
"""

from __future__ import annotations

import functools
import inspect
import typing
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from qmpnet.cli.connect import GuestCall, Where
from qmpnet.cli.flags import Given
from qmpnet.cli.signatures import defer, ready

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from qmpnet.cli.flags import Flag


class ProtocolArg(StrEnum):
    """MQTT versions for broker mode."""

    auto = "auto"
    v5 = "5"
    v311 = "3.1.1"


def broker_option(help_text: str) -> Any:  # noqa: ANN401 - typer's OptionInfo, typed as Any by typer itself
    """``--broker URL``: the MQTT broker, with the help text of the command that takes it."""
    return typer.Option("--broker", metavar="URL", help=help_text)


def protocol_option(help_text: str) -> Any:  # noqa: ANN401 - as above
    """``--mqtt-protocol``: the MQTT version to speak, with the help text of the command that takes it."""
    return typer.Option("--mqtt-protocol", help=help_text)


QmpOpt = Annotated[
    str | None,
    typer.Option("--qmp", metavar="SOCKET", help="Direct mode: the guest's QMP socket (unix path or host:port)."),
]
BrokerOpt = Annotated[
    list[str] | None,
    broker_option(
        "Broker mode: mqtt[s]://host:port where `qmpnet serve` listens; repeatable (the nodes of one cluster, "
        "tried in order)."
    ),
]
GuestOpt = Annotated[str | None, typer.Option("--guest", metavar="NAME", help="Broker mode: the guest's name.")]
ProtocolOpt = Annotated[
    ProtocolArg | None,
    protocol_option("Broker mode: MQTT version (default auto: 5, or 3.1.1 if the broker refuses 5)."),
]
ControllerOpt = Annotated[
    str | None,
    typer.Option("--controller", metavar="ID", help="Broker mode: the controller id (default: this host's name)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the MQTT API's JSON object instead of a table.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", metavar="FILE", help="TOML settings file (timeouts, policy).", show_default=False),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log what is sent to QEMU on stderr.")]
QgaOpt = Annotated[
    str | None,
    typer.Option("--qga", metavar="SOCKET", show_default=False,
                 help="Direct mode: the guest agent's socket (found through QMP when not given)."),
]
VerifyOpt = Annotated[
    bool, typer.Option("--verify", help="Wait until the guest itself shows the change (needs its guest agent).")
]
VerifyAddressOpt = Annotated[bool, typer.Option("--verify-address", help="As --verify, and wait for an address too.")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", metavar="DIR", help="Where qmpnet keeps what it knows of each guest (default: "
                 "/var/lib/qmpnet, or $QMPNET_STATE_DIR).", show_default=False),
]

#: The options of every guest command, in the order ``--help`` lists them: (parameter, type, default).
_GUEST_OPTIONS: tuple[tuple[str, object, object], ...] = (
    ("qmp", QmpOpt, None),
    ("broker", BrokerOpt, None),
    ("guest", GuestOpt, None),
    ("controller", ControllerOpt, None),
    ("mqtt_protocol", ProtocolOpt, None),
    ("as_json", JsonOpt, False),
    ("config", ConfigOpt, None),
    ("verbose", VerboseOpt, False),
    ("state_dir", StateDirOpt, None),
)
_QGA_OPTION = ("qga", QgaOpt, None)
_VERIFY_OPTIONS = (("verify", VerifyOpt, False), ("verify_address", VerifyAddressOpt, False))

Command = typing.TypeVar("Command", bound="Callable[..., None]")


def flag_parameter(flag: Flag) -> inspect.Parameter:
    """The parameter typer reads ``flag`` from: ``param: Annotated[kind, typer.Option(...)] = default``."""
    option = typer.Option(flag.decl, metavar=flag.metavar, help=flag.help)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Parameter(flag.param, kind, default=flag.default, annotation=_ANNOTATED[flag.kind, option])


_ANNOTATED: Any = Annotated  # subscripted with a flag's type and option at run time


def _with_signature(function: Callable[..., None], params: list[inspect.Parameter]) -> None:
    """Make typer read ``params`` as ``function``'s parameters."""
    function.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    function.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}


def _own_parameters(command: Callable[..., None]) -> list[inspect.Parameter]:
    ready(command)  # a command decorated twice: the inner decorator's signature first
    hints = typing.get_type_hints(command, include_extras=True)  # typer reads the evaluated annotations
    return [p.replace(annotation=hints[p.name]) for p in inspect.signature(command).parameters.values()]


def flag_options(flags: Sequence[Flag]) -> Callable[[Command], Command]:
    """Give a command the options ``flags`` declare, in their order, after its own parameters but its last.

    The command's last parameter, ``flags``, receives their values as one :class:`Given`.
    """

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def with_flags(*args: Any, **values: Any) -> None:  # noqa: ANN401 - the values typer parsed, of every type
            given = Given({flag.param: values.pop(flag.param) for flag in flags})
            command(*args, **values, flags=given)

        def build() -> None:
            _with_signature(with_flags, _own_parameters(command)[:-1] + [flag_parameter(flag) for flag in flags])

        defer(with_flags, build)
        return typing.cast("Command", with_flags)

    return decorate


def guest_options(
    *, qga: bool = False, verify: bool = False, verify_address: bool = False
) -> Callable[[Command], Command]:
    """Give a guest command the shared options, which it receives as a :class:`GuestCall`, its first argument.

    The command's own parameters come first in ``--help``, then ``--qmp``, the broker options, ``--json``,
    ``--config``, ``--verbose``, ``--state-dir`` and, when asked for, ``--qga``, ``--verify`` and
    ``--verify-address``.
    """
    shared = [*_GUEST_OPTIONS, *([_QGA_OPTION] if qga else []), *_VERIFY_OPTIONS[: verify + verify_address]]

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def with_options(**values: Any) -> None:  # noqa: ANN401 - the values typer parsed, of every option's type
            where = Where(
                values.pop("qmp"), values.pop("broker"), values.pop("guest"), values.pop("controller"),
                values.pop("state_dir"), values.pop("qga", None), protocol=values.pop("mqtt_protocol"),
            )  # fmt: skip
            plain, address = values.pop("verify", False), values.pop("verify_address", False)
            call = GuestCall(where, values.pop("config"), values.pop("verbose"), values.pop("as_json"),
                             "address" if address else plain)  # fmt: skip
            command(call, **values)

        def build() -> None:
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
            shared_params = [inspect.Parameter(name, kind, default=d, annotation=a) for name, a, d in shared]
            _with_signature(with_options, _own_parameters(command)[1:] + shared_params)

        defer(with_options, build)
        return typing.cast("Command", with_options)

    return decorate
