"""The loader behind qmpnet's lazily exported names (PEP 562): a package names its exports and pays on first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, MutableMapping


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: MutableMapping[str, object]
) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: import a public name's module on first use, and keep the name.

    Args:
        package: The package's name, for the error message.
        exports: Where each public name lives (name → module).
        namespace: The package's ``globals()``, where a loaded name is kept (the next access does not get here).
    """

    def getattr_(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return getattr_
