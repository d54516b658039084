"""The ``qmpnet`` command line (console script ``qmpnet = "qmpnet.cli:main"``).

:mod:`.commands` holds the commands; :mod:`.demo` is ``qmpnet demo``.
"""

from qmpnet.cli.commands import main

__all__ = ["main"]
