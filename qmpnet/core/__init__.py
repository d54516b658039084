"""The pure core: qmpnet's vocabulary and its decisions, with no I/O.

The edge models (:mod:`.model`), the id, MAC, PCI-address, interface-name and tc-unit rules, PCI placement, the
hot-add plan, caller policy, the lane's inventory, the state store's records, the recovery plan, the desired-state
diff, the host-network settings, the backoff rule and the ports (protocols) the outer layers plug into. Nothing
here imports asyncio, qemu.qmp, aiomqtt, pyroute2, sockets or subprocesses (import-linter checks it).
"""
