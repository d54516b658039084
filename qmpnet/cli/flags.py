"""Options as data: a command's flags in a table (:func:`flag_table`), their values (:class:`Given`), the link enum.

Neither typer nor pydantic is imported here: the command line's quick path (:mod:`.quick`) reads ``nic add``'s
flags from the same tables the full command line gives typer (:mod:`.options`), before either is loaded.
"""

from __future__ import annotations

import typing
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Mapping


class LinkArg(StrEnum):
    """Link states."""

    up = "up"
    down = "down"


# A NamedTuple, not a frozen dataclass, as the CLI's other value types (cli/connect.py).
class Flag(NamedTuple):
    """One option of a command, as data: its parameter, its type and default, and what ``--help`` shows of it."""

    param: str  #: the parameter name: the key of its value in :class:`Given`, and click's name of the option
    kind: object  #: the type typer parses the value into
    default: object
    decl: str  #: the option, e.g. ``--hub``
    metavar: str | None
    help: str


#: The kinds of value a flag table names: the type typer parses it into, and the value when the flag is not given.
KINDS: dict[str, tuple[object, object]] = {
    "text": (str | None, None),
    "int": (int | None, None),
    "texts": (list[str] | None, None),  # a repeatable flag
    "switch": (bool, False),  # a flag without a value
    "link": (LinkArg | None, None),
}


def flag_table(table: str, kinds: Mapping[str, tuple[object, object]] | None = None) -> tuple[Flag, ...]:
    """The flags of ``table``, one a line: ``param kind --option METAVAR help`` (``-``: no metavar).

    ``kind`` is one of :data:`KINDS` or of ``kinds``. The table is the order ``--help`` lists the flags in.
    """
    known = {**KINDS, **(kinds or {})}
    flags = []
    for line in table.strip().splitlines():
        param, kind, decl, metavar, text = line.split(maxsplit=4)
        annotation, default = known[kind]
        flags.append(Flag(param, annotation, default, decl, None if metavar == "-" else metavar, text))
    return tuple(flags)


Choice = typing.TypeVar("Choice", bound=StrEnum)


class Given(NamedTuple):
    """The values of a command's flags as typer (or the quick path) parsed them, by parameter name, typed by kind."""

    values: Mapping[str, object]

    def text(self, name: str) -> str | None:
        """A ``text`` flag's value (``None``: not given)."""
        return typing.cast("str | None", self.values[name])

    def number(self, name: str) -> int | None:
        """An ``int`` flag's value (``None``: not given)."""
        return typing.cast("int | None", self.values[name])

    def texts(self, name: str) -> list[str]:
        """A repeatable flag's values, in order (none given: empty)."""
        return list(typing.cast("list[str] | None", self.values[name]) or ())

    def switch(self, name: str) -> bool:
        """Whether a flag without a value was given."""
        return bool(self.values[name])

    def choice(self, name: str, kind: type[Choice]) -> Choice | None:  # noqa: ARG002 - the type is for the caller
        """A flag's value of the enum ``kind`` (``None``: not given)."""
        return typing.cast("Choice | None", self.values[name])
