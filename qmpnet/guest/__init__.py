"""One guest: its facade (:class:`.guest.Guest`), its lane, and the units the lane hands each job to.

:mod:`.guest` is the facade; :mod:`.lane`, :mod:`.journal` (the record) and :mod:`.nic_table` (the per-NIC state)
are what every unit shares; :mod:`.hotadd`, :mod:`.unplugs`, :mod:`.live_changes`, :mod:`.recoverer`,
:mod:`.verification` and :mod:`.late_events` do one job each; :mod:`.hotadd_steps` runs a hot-add plan and
:mod:`.update` a live change, both on an :mod:`.undo` stack; :mod:`.capture` records a NIC's traffic, and
:mod:`.apply_desired` carries out a desired-state diff through any ``GuestOps``. docs/architecture.md has the
table. This ``__init__`` imports none of them.
"""
