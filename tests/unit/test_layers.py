"""The import-linter layers contract names every module of the package, so no module escapes the layering."""

from __future__ import annotations

import pkgutil
import re
import tomllib
from pathlib import Path

import qmpnet

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"


def test_every_top_level_module_is_in_a_layer() -> None:
    config = tomllib.loads(PYPROJECT.read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    layered = {name.strip() for layer in layers for name in re.split(r"[|:]", layer)}
    modules = {info.name for info in pkgutil.iter_modules(qmpnet.__path__)}
    assert modules, "found no modules in the package"
    assert modules - layered == set(), "modules missing from the layers contract in pyproject.toml"
    assert layered - modules == set(), "layers naming modules that do not exist"
