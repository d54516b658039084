"""``qmpnet serve``: the controller of a fleet of guests and what runs around it.

:mod:`.compose` is the composition root (settings become adapters, everything runs until a signal),
:mod:`.controller` supervises one member per guest and routes requests, :mod:`.reconcile_loop` converges each
guest on its desired set, :mod:`.control_socket` lets the local CLI reach a guest the controller holds, and
:mod:`.metrics` exports Prometheus metrics.
"""
