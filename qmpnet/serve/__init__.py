"""``qmpnet serve``: the controller of a fleet of guests and what runs around it.

:mod:`.compose` is the composition root (settings become adapters, everything runs until a signal),
:mod:`.controller` holds the fleet, one member per guest: its :mod:`.supervisor` (the connection, reconnects,
the lane), its :mod:`.request_router` (requests into the lane, de-duplicated) and its :mod:`.desired_intake`,
sharing a :mod:`.fleet_context`; :mod:`.published_nics` keeps each guest's retained NIC list, :mod:`.discovery`
reads the guest directory, :mod:`.reconcile_loop` converges each guest on its desired set, :mod:`.control_socket`
lets the local CLI reach a guest the controller holds, and :mod:`.metrics` exports Prometheus metrics.
"""
