"""The ``qmpnet`` command line (console script ``qmpnet = "qmpnet.cli:main"``).

:mod:`.root` is the command and :func:`main`; each command group has its module (:mod:`.nic`, :mod:`.net`,
:mod:`.serve`, :mod:`.apply`, :mod:`.models`, :mod:`.schema`, :mod:`.demo_command`), the options they share are
:mod:`.options`, how a command reaches its guest or host :mod:`.connect`, its output :mod:`.output` and its exit
status :mod:`.exits`. :mod:`.demo` is the demo ``qmpnet demo`` runs.
"""

from qmpnet.cli.root import main

__all__ = ["main"]
