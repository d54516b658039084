"""No module over 600 lines and no class over 400 (issue 16), anywhere in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qmpnet

ROOT = Path(qmpnet.__file__).parent
MAX_MODULE = 600
MAX_CLASS = 400
#: Every folder of the package, and its top level (".": the modules directly in qmpnet/).
FOLDERS = sorted([".", *(path.name for path in ROOT.iterdir() if path.is_dir() and (path / "__init__.py").exists())])


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_module_or_class_is_too_long(folder: str) -> None:
    too_long: list[str] = []
    paths = (ROOT / folder).glob("*.py") if folder == "." else (ROOT / folder).rglob("*.py")
    for path in sorted(paths):
        source = path.read_text()
        name = path.relative_to(ROOT)
        lines = len(source.splitlines())
        if lines > MAX_MODULE:
            too_long.append(f"{name}: {lines} lines (at most {MAX_MODULE})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS:
                    too_long.append(f"{name}: class {node.name} has {length} lines (at most {MAX_CLASS})")
    assert too_long == []
