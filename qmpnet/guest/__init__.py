"""One guest: its lane (:class:`.guest.Guest`) and the operations the lane runs.

:mod:`.hotadd_steps` runs a hot-add plan with an undo stack, :mod:`.update` makes live changes of a NIC,
:mod:`.capture` records a NIC's traffic, and :mod:`.apply_desired` carries out a desired-state diff through any
``GuestOps``. This ``__init__`` imports none of them.
"""
