"""The import-linter layers contracts name every module of the package, so no module escapes the layering.

The top contract layers the folders and the few top-level modules; a folder whose modules sit at different heights
(``api/``) is named by its modules instead. Each folder with a layers contract of its own must name every module in
it.
"""

from __future__ import annotations

import pkgutil
import re
import tomllib
from pathlib import Path
from typing import Any

import qmpnet

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"
ROOT = Path(qmpnet.__file__).parent


def _layered(contract: dict[str, Any]) -> set[str]:
    return {name.strip() for layer in contract["layers"] for name in re.split(r"[|:]", layer)}


def _children(package: str) -> set[str]:
    path = ROOT.joinpath(*package.split(".")[1:])
    return {info.name for info in pkgutil.iter_modules([str(path)])}


def _layer_contracts() -> list[dict[str, Any]]:
    config = tomllib.loads(PYPROJECT.read_text())
    return [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]


def test_every_top_level_module_and_folder_is_in_a_layer() -> None:
    top = next(c for c in _layer_contracts() if c["containers"] == ["qmpnet"])
    layered = _layered(top)
    modules = _children("qmpnet")
    assert modules, "found no modules in the package"
    split = {name.split(".")[0] for name in layered if "." in name}
    whole = {name for name in layered if "." not in name}
    assert modules - whole - split == set(), "modules missing from the layers contract in pyproject.toml"
    assert whole | split <= modules, "layers naming modules that do not exist"
    for folder in split:
        named = {name.split(".", 1)[1] for name in layered if name.startswith(folder + ".")}
        assert _children(f"qmpnet.{folder}") == named, f"{folder}/ is split into layers: name each of its modules"


def test_every_module_of_a_layered_folder_is_in_its_contract() -> None:
    inner = [c for c in _layer_contracts() if c["containers"] != ["qmpnet"]]
    assert inner, "no per-folder layers contracts"
    for contract in inner:
        (container,) = contract["containers"]
        assert _children(container) == _layered(contract), f"{container}: modules and layers differ"
