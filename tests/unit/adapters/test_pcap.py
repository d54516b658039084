"""Repairing filter-dump captures of virtio NICs on taps (qmpnet.adapters.pcap): the
header QEMU < 8.1 leaves is found by
where real EtherTypes (and the NIC's MAC) show up, and only then stripped."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import pytest

from qmpnet.adapters.pcap import strip_vnet_headers

if TYPE_CHECKING:
    from pathlib import Path

MAC = "52:54:00:12:34:56"
OTHER = bytes.fromhex("020000000001")
ME = bytes.fromhex(MAC.replace(":", ""))
BROADCAST = b"\xff" * 6


def pcap(frames: list[bytes], *, header: int, order: str = "<") -> bytes:
    out = struct.pack(order + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65536, 1)
    for index, frame in enumerate(frames):
        data = b"\0" * header + frame
        out += struct.pack(order + "IIII", 1000 + index, index, len(data), len(data)) + data
    return out


def frames() -> list[bytes]:
    ip = b"\x08\x00" + b"E" + b"\0" * 45
    return [BROADCAST + ME + b"\x08\x06" + b"\0" * 28, OTHER + ME + ip, ME + OTHER + ip, BROADCAST + OTHER + ip]


def read(data: bytes) -> list[bytes]:
    offset, found = 24, []
    while offset < len(data):
        _, _, included, original = struct.unpack_from("<IIII", data, offset)
        assert included == original
        found.append(data[offset + 16 : offset + 16 + included])
        offset += 16 + included
    return found


@pytest.mark.parametrize("header", [10, 12, 20])
def test_the_header_is_found_and_stripped(tmp_path: Path, header: int) -> None:
    path = tmp_path / "c.pcap"
    path.write_bytes(pcap(frames(), header=header))
    path.chmod(0o640)
    assert strip_vnet_headers(path, MAC) == header
    assert read(path.read_bytes()) == frames()
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["c.pcap"]
    assert strip_vnet_headers(path, MAC) == 0  # clean now: a second pass changes nothing


def test_a_clean_capture_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    original = pcap(frames(), header=0)
    path.write_bytes(original)
    assert strip_vnet_headers(path, MAC) == 0
    assert path.read_bytes() == original


@pytest.mark.parametrize("content", [b"", b"not a pcap at all, just some bytes", pcap([], header=12)])
def test_what_is_not_a_capture_of_frames_is_left_alone(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "c.pcap"
    path.write_bytes(content)
    assert strip_vnet_headers(path, MAC) == 0
    assert path.read_bytes() == content


def test_a_missing_file_is_nothing_to_do(tmp_path: Path) -> None:
    assert strip_vnet_headers(tmp_path / "gone.pcap", MAC) == 0


def test_frames_that_are_not_the_nics_still_reveal_the_header(tmp_path: Path) -> None:
    # Multicast from other hosts (IPv6 neighbour discovery, MLD) outnumbering the NIC's own frames.
    noise = [bytes.fromhex("3333ff51a672") + OTHER + b"\x86\xdd" + b"\0" * 60] * 9
    path = tmp_path / "c.pcap"
    path.write_bytes(pcap([*noise, *frames()[:2]], header=12))
    assert strip_vnet_headers(path, MAC) == 12
    assert read(path.read_bytes()) == [*noise, *frames()[:2]]


def test_frames_without_a_recognisable_ethertype_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    original = pcap([BROADCAST + OTHER + b"\x12\x34" + b"\0" * 46] * 4, header=0)
    path.write_bytes(original)
    assert strip_vnet_headers(path, MAC) == 0
    assert path.read_bytes() == original
