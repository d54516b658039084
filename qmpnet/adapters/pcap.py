"""Repairing the pcap files QEMU's ``filter-dump`` writes for a virtio NIC on a tap: strip the virtio-net headers.

Between virtio-net and a tap that uses vnet headers (every tap qmpnet makes: ``IFF_VNET_HDR``, for checksum and
segmentation offload), each frame starts with a virtio-net header (10, 12 or 20 bytes, by the features the guest
negotiated). QEMU before 8.1 dumps that header as if it were part of the Ethernet frame, so tcpdump shows
``00:00:00:00:00:00 > 00:00:00:00:00:00, ethertype Unknown``; later QEMUs strip it themselves. Rather than guess
from QEMU's version, :func:`strip_vnet_headers` looks at the file: the header length is the offset after which
the frames carry real EtherTypes (and the NIC's own MAC), and ``0`` (nothing to do) when that is the start. The
file is rewritten through a temporary file in the same directory and renamed over the original, so a reader never
sees half a file.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Final

__all__ = ["strip_vnet_headers"]

_GLOBAL: Final = struct.Struct("<IHHiIII")
_RECORD_FIELDS: Final = "IIII"
#: The virtio-net header lengths a guest can negotiate: legacy, with mergeable buffers or VERSION_1, with hash report.
_HEADERS: Final = (10, 12, 20)
_SAMPLE: Final = 256
#: EtherTypes a frame of a guest's NIC carries: IPv4, ARP, RARP (announce-self), VLAN, QinQ, IPv6, LLDP.
_ETHERTYPES: Final = frozenset(t.to_bytes(2, "big") for t in (0x0800, 0x0806, 0x8035, 0x8100, 0x88A8, 0x86DD, 0x88CC))
_MAGICS: Final = {0xA1B2C3D4: "<", 0xD4C3B2A1: ">", 0xA1B23C4D: "<", 0x4D3CB2A1: ">"}


def strip_vnet_headers(path: str | Path, mac: str) -> int:
    """Remove the virtio-net header QEMU left in front of every frame in pcap ``path``; returns its length (0: none).

    A file that is missing, not a pcap, or empty is left alone (``0``).

    Raises:
        OSError: The file cannot be read or replaced.
    """
    target = Path(path)
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        return 0
    order = _byte_order(data)
    if order is None:
        return 0
    records = list(_records(data, order))
    header = _header_length([frame for _, frame in records[:_SAMPLE]], bytes.fromhex(mac.replace(":", "")))
    if header == 0:
        return 0
    record = struct.Struct(order + _RECORD_FIELDS)
    out = bytearray(data[: _GLOBAL.size])
    for (seconds, micros, original), frame in records:
        kept = frame[header:] if len(frame) > header else b""
        out += record.pack(seconds, micros, len(kept), max(0, original - header)) + kept
    temporary = target.with_name(f".{target.name}.qmpnet")
    try:
        temporary.write_bytes(out)
        temporary.chmod(target.stat().st_mode & 0o777)
        temporary.replace(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    return header


def _byte_order(data: bytes) -> str | None:
    if len(data) < _GLOBAL.size:
        return None
    (magic,) = struct.unpack_from("<I", data)
    return _MAGICS.get(magic)


def _records(data: bytes, order: str) -> list[tuple[tuple[int, int, int], bytes]]:
    record = struct.Struct(order + _RECORD_FIELDS)
    found = []
    offset = _GLOBAL.size
    while offset + record.size <= len(data):
        seconds, micros, included, original = record.unpack_from(data, offset)
        offset += record.size
        found.append(((seconds, micros, original), data[offset : offset + included]))
        offset += included
    return found


def _header_length(frames: list[bytes], mac: bytes) -> int:
    """The virtio-net header length in front of ``frames``, or 0 when they start with their Ethernet header.

    At the right offset nearly every frame has a real EtherType (IPv4, ARP, IPv6, VLAN ...) after its two MACs; at
    a wrong one those two bytes are a piece of a MAC address or of the header. Ties go to where the NIC's own MAC
    is a frame's destination or source.
    """

    def score(offset: int) -> tuple[int, int]:
        types = sum(frame[offset + 12 : offset + 14] in _ETHERTYPES for frame in frames)
        macs = sum(mac in (frame[offset : offset + 6], frame[offset + 6 : offset + 12]) for frame in frames)
        return types, macs

    scores = {offset: score(offset) for offset in (0, *_HEADERS)}
    best = max(_HEADERS, key=lambda offset: scores[offset])
    return best if scores[best] > scores[0] and scores[best][0] > 0 else 0
