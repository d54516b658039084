"""A guest record's two slot files: each write overwrites the older slot in place, framed so a torn one is never read.

A record is written without fsync (it protects against the death of the process, which the page cache survives) and
without renaming a file over another (on ext4 that starts the new data's writeback: ~0.25 ms of CPU per write, most
of a hot-add's store cost). Instead the record alternates between two files, ``<key>.record-a`` and
``<key>.record-b``; each write overwrites the slot that does *not* hold the newest record, from offset 0, as one
frame::

    qmpnet-record seq=<n> length=<bytes> crc32=<8 hex digits>   (one line)
    <the record's JSON, exactly length bytes>

A process killed in mid-write leaves that slot torn (the new header with part of the new JSON and part of the old,
or a short file): its length or checksum does not match, so it is not a record, and the other slot, the write
before, is. The newest slot whose frame checks out (the highest ``seq``) is the record. Bytes after the frame (a
longer earlier record, when the process died before the file was cut to the new length) are ignored.

The desired set, which must outlive a reboot, alternates the same way between ``<key>.desired-a`` and
``<key>.desired-b``, each write followed by ``fdatasync``: a power cut in mid-write tears only the slot being
written, and the other holds the set synced before it. (A temp file renamed over the old one took an fsync of the
file, a rename and an fsync of the directory: ~4.5x the system time of one in-place write and its ``fdatasync``.)
The body ``null`` there says there is no desired set.
"""

from __future__ import annotations

import re
import zlib
from typing import Final

__all__ = ["DESIRED_SUFFIXES", "NO_DESIRED_SET", "SLOT_SUFFIXES", "Torn", "frame", "frame_header", "unframe"]

#: The two slot files of a record: ``<key>`` + each suffix.
SLOT_SUFFIXES: Final = (".record-a", ".record-b")
#: The two slot files of a desired set.
DESIRED_SUFFIXES: Final = (".desired-a", ".desired-b")
#: A desired slot's body when the guest has no desired set.
NO_DESIRED_SET: Final = b"null"

_MAGIC: Final = b"qmpnet-record "
_HEADER: Final = re.compile(rb"qmpnet-record seq=(\d{1,20}) length=(\d{1,12}) crc32=([0-9a-f]{8})\n")


class Torn(Exception):
    """A slot file that holds no complete record (its message says what is wrong)."""


def frame(seq: int, body: bytes) -> bytes:
    """``body`` (a record's JSON) framed as slot write number ``seq``."""
    return frame_header(seq, body) + body


def frame_header(seq: int, body: bytes) -> bytes:
    """The header line of ``body``'s frame as slot write number ``seq``: what :func:`frame` puts before ``body``.

    The store writes the two with one ``pwritev``, without making the frame: a copy of the whole record less.
    """
    return b"qmpnet-record seq=%d length=%d crc32=%08x\n" % (seq, len(body), zlib.crc32(body))


def unframe(raw: bytes) -> tuple[int, bytes]:
    """The write number and the record's JSON of a slot file's content.

    Raises:
        Torn: No complete frame: not a slot file, or a write cut short (its length or checksum does not match).
    """
    header = _HEADER.match(raw)
    if header is None:
        if not raw:
            raise Torn("empty")
        if raw.startswith(_MAGIC) or _MAGIC.startswith(raw):
            raise Torn(f"a torn header ({len(raw)} bytes)")
        raise Torn("not a record slot (no qmpnet-record header)")
    seq, length, crc = int(header[1]), int(header[2]), int(header[3], 16)
    body = raw[header.end() : header.end() + length]
    if len(body) < length:
        raise Torn(f"truncated: {len(body)} of {length} bytes")
    if zlib.crc32(body) != crc:
        raise Torn("its checksum does not match (a write cut short, or changed by hand)")
    return seq, body
