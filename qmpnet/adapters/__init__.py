"""Adapters: the only code that talks to the outside world.

``qmp/`` (the only importer of ``qemu.qmp``), ``qga/`` (qemu-guest-agent), ``hostnet/`` (pyroute2, nft, dnsmasq,
sysfs), ``store/`` (the state directory), ``mqtt/`` (the only importer of ``aiomqtt`` and ``paho``) and
:mod:`.pcap` (repairs QEMU < 8.1 captures). Errors are translated into qmpnet's at this border.
"""
