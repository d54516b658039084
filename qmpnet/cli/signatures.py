"""The parameters a decorated command shows typer, worked out when the command is built rather than defined.

:func:`~qmpnet.cli.options.guest_options` and :func:`~qmpnet.cli.options.flag_options` give a command a signature
of dozens of options. A module defines all its commands, but a call that names one builds that one alone
(:func:`qmpnet.cli.root.build_app`): the decorators leave their work here (:func:`defer`) and the app does it for
the commands it builds (:func:`ready`), ~10 M instructions fewer for ``nic add`` (docs/performance.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

#: The attribute that holds a command's signature still to be worked out.
_PENDING = "__qmpnet_signature__"


def defer(command: Callable[..., object], build: Callable[[], None]) -> None:
    """Have ``build`` give ``command`` its signature when :func:`ready` is called on it."""
    setattr(command, _PENDING, build)


def ready(command: Callable[..., object]) -> None:
    """Give ``command`` the signature its decorators declared, if it is still to be worked out (once)."""
    build = vars(command).pop(_PENDING, None)
    if build is not None:
        build()
