"""The ``qmpnet`` command builds only what a call reaches, and what it builds is the same as the full tree's."""

from __future__ import annotations

import pytest
import typer
import typer.main

from qmpnet.cli.root import COMMANDS, build_app


def described(command: typer.core.TyperCommand | typer.core.TyperGroup) -> list[tuple[object, ...]]:
    """What a user sees of a command: its help and its parameters (names, flags, metavars, help, defaults)."""
    params = [(p.name, p.opts, p.secondary_opts, p.metavar, getattr(p, "help", None), repr(p.default), p.required,
               p.multiple, p.nargs, getattr(p, "is_flag", None), getattr(p, "show_default", None), p.is_eager)
              for p in command.params]  # fmt: skip
    return [(command.name, command.help, command.short_help, *params)]


def leaves() -> list[list[str]]:
    full = typer.main.get_command(build_app([]))
    assert isinstance(full, typer.core.TyperGroup)
    found: list[list[str]] = []
    for name, command in full.commands.items():
        subcommands = getattr(command, "commands", None)
        found += [[name, sub] for sub in subcommands] if subcommands else [[name]]
    return found


def test_the_full_tree_lists_every_command_in_order() -> None:
    full = typer.main.get_command(build_app(["--help"]))
    assert isinstance(full, typer.core.TyperGroup)
    assert list(full.commands) == list(COMMANDS)


@pytest.mark.parametrize("path", leaves(), ids=" ".join)
def test_a_named_command_is_built_alone_and_as_in_the_full_tree(path: list[str]) -> None:
    full = typer.main.get_command(build_app([]))
    alone = typer.main.get_command(build_app([*path, "--json"]))
    assert isinstance(full, typer.core.TyperGroup)
    assert isinstance(alone, typer.core.TyperGroup)
    assert described(alone) == described(full)
    assert list(alone.commands) == path[:1]
    want, got = full.commands[path[0]], alone.commands[path[0]]
    if len(path) > 1:
        assert isinstance(want, typer.core.TyperGroup)
        assert isinstance(got, typer.core.TyperGroup)
        assert list(got.commands) == path[1:]
        assert described(got) == described(want)
        want, got = want.commands[path[1]], got.commands[path[1]]
    assert isinstance(want, typer.core.TyperCommand)
    assert isinstance(got, typer.core.TyperCommand)
    assert described(got) == described(want)


@pytest.mark.parametrize("args", [[], ["--help"], ["nope"], ["--version"], ["nick", "add"]])
def test_a_call_that_names_no_known_command_gets_every_command(args: list[str]) -> None:
    built = typer.main.get_command(build_app(args))
    assert isinstance(built, typer.core.TyperGroup)
    assert list(built.commands) == list(COMMANDS)


@pytest.mark.parametrize("args", [["nic"], ["nic", "--help"], ["nic", "ad"], ["--version", "nic"]])
def test_a_group_without_a_known_subcommand_gets_all_of_them(args: list[str]) -> None:
    built = typer.main.get_command(build_app(args))
    assert isinstance(built, typer.core.TyperGroup)
    assert list(built.commands) == ["nic"]
    nic = built.commands["nic"]
    assert isinstance(nic, typer.core.TyperGroup)
    assert list(nic.commands) == ["add", "del", "link", "list", "set", "capture"]  # "Did you mean 'add'?" needs them
