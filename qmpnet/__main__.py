"""``python -m qmpnet``: the command line."""

from qmpnet.cli import main

main()
