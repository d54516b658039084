"""Reading the state store's files: the boot id, records and desired sets (older formats migrated).

A file that cannot be read is moved aside and reported rather than locking its guest out.

Kept apart from :mod:`.files` (the write side, the locks and the store objects): everything here turns bytes on
disk into records, or says exactly why it cannot.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pydantic import ValidationError

from qmpnet.core.model import DiscardedRecord
from qmpnet.core.records import FORMAT_VERSION, MIGRATED_VERSIONS, DesiredSet, GuestRecord, migrated
from qmpnet.errors import StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "BOOT_ID_FILE",
    "Unreadable",
    "boot_time",
    "json_object",
    "load_any",
    "load_desired",
    "load_record",
    "mtime_of",
    "read_boot_id",
    "read_or_discard",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Where the kernel tells the id of the current boot (a new random one at every boot).
BOOT_ID_FILE: Final = Path("/proc/sys/kernel/random/boot_id")


class Unreadable(Exception):
    """A record file that cannot be used (its message says why)."""


def read_boot_id(path: Path = BOOT_ID_FILE) -> str | None:
    """The id of the current boot (``None`` where the kernel does not tell it: every record is then kept)."""
    try:
        return path.read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def boot_time() -> float | None:
    """When the host booted (``btime`` of /proc/stat), to date records that carry no boot id."""
    try:
        with Path("/proc/stat").open(encoding="ascii") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_or_discard(
    path: Path, load: Callable[[bytes], _T], discarded: list[DiscardedRecord]
) -> _T | None:
    """``load`` of the file at ``path`` (``None``: no file); one that cannot be read is moved aside and reported."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StoreUnavailable(f"state_dir: cannot read {path} ({err.strerror or err})", field="state_dir") from err
    try:
        return load(raw)
    except Unreadable as err:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}")
        try:
            path.rename(aside)
        except OSError as failed:
            raise StoreUnavailable(
                f"state_dir: {path} cannot be read ({err}) nor moved aside ({failed.strerror or failed})",
                field="state_dir",
            ) from failed
        log.warning("state_dir: %s cannot be read (%s): moved aside as %s; the guest is rebuilt from QEMU",
                    path, err, aside.name)
        discarded.append(DiscardedRecord(file=str(path), moved_to=str(aside), reason=str(err)))
        return None


def mtime_of(path: Path) -> float | None:
    """When the file at ``path`` was last changed (``None``: it cannot be told)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` parsed as a JSON object.

    Raises:
        Unreadable: It is not JSON, or not an object.
    """
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise Unreadable(f"not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise Unreadable(f"not a JSON object but {type(data).__name__}")
    return data


def load_any(raw: bytes, *, boot: str | None, mtime: float | None = None) -> tuple[GuestRecord, bool]:
    """A record file's record, and whether it is in an older format (migrated: it wants rewriting)."""
    data = json_object(raw)
    version = data.get("version")
    stale = False
    if version in MIGRATED_VERSIONS:
        # Version 1 carried no boot id: one written since this boot began is of this boot.
        booted = boot_time()
        of_this_boot = booted is not None and mtime is not None and mtime >= booted
        data, stale = migrated(data, boot=boot if of_this_boot else None), True
    elif version != FORMAT_VERSION:
        raise Unreadable(f"format version {version!r}; this qmpnet reads version {FORMAT_VERSION}")
    try:
        return GuestRecord.model_validate(data), stale
    except ValidationError as err:
        raise Unreadable(
            f"not a valid guest record ({err.error_count()} errors: {err.errors(include_url=False)[0]['msg']})"
        ) from err


def load_record(path: Path, *, boot: str | None) -> GuestRecord | None:
    """The record in ``path`` (``None``: no file), without its desired set's file.

    Raises:
        Unreadable: It cannot be read or parsed.
    """
    try:
        raw = path.read_bytes()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError as err:
        raise Unreadable(err.strerror or str(err)) from err
    return load_any(raw, boot=boot, mtime=mtime)[0]


def load_desired(raw: bytes) -> DesiredSet:
    """A desired-set file's set.

    Raises:
        Unreadable: It cannot be parsed.
    """
    try:
        return DesiredSet.model_validate(json_object(raw))
    except ValidationError as err:
        raise Unreadable(
            f"not a valid desired set ({err.error_count()} errors: {err.errors(include_url=False)[0]['msg']})"
        ) from err

