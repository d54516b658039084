"""The state store: one directory holding, per guest, what QEMU cannot tell (see :mod:`qmpnet.core.records`).

    <state_dir>/guests/<key>.record-a       the guest's record, in two slot files written in turn, in place, framed
    <state_dir>/guests/<key>.record-b       with a write number and a checksum (the newest complete one; no fsync)
    <state_dir>/guests/<key>.desired-a      its desired set, in two slots the same way, each write followed by
    <state_dir>/guests/<key>.desired-b      fdatasync (it outlives a reboot)
    <state_dir>/guests/<key>.desired.json   the desired set as an earlier qmpnet wrote it (read, moved into the slots)
    <state_dir>/guests/<name>.corrupt-<ts>  a file that could not be read, moved aside (never deleted)
    <state_dir>/guests/<key>.json           the record as an earlier qmpnet wrote it (read, moved into the slots)
    <state_dir>/guests/<key>.lock           flock'd by the one qmpnet process that works on the guest
    <state_dir>/control.sock                the local control socket of a running ``qmpnet serve`` (root only)

The key is derived from the guest's QMP address, so the CLI, the Python API and ``qmpnet serve`` on one host
share one record per guest whatever name each gives it. The lock makes two qmpnet processes touching one guest
safe: the second waits (up to the connect timeout) and then answers ``busy``, naming the holder.
"""

from qmpnet.adapters.store.files import FileGuestStore, MemoryGuestStore, StateDir, canonical_address, guest_key

__all__ = ["FileGuestStore", "MemoryGuestStore", "StateDir", "canonical_address", "guest_key"]
