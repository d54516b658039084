"""Reading the state store's files: the boot id, records and desired sets (older formats migrated).

A record is the newest complete one of its two slot files (:mod:`.slots`); a store written before the slots (one
``<key>.json``, renamed into place at each write) is read as before and migrated. A record that cannot be read is
moved aside and reported rather than locking its guest out; a slot torn by a kill is not unreadable, it is the
write that did not happen (the other slot holds the one before).

Kept apart from :mod:`.files` (the write side, the locks and the store objects): everything here turns bytes on
disk into records, or says exactly why it cannot.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from pydantic import ValidationError

from qmpnet.adapters.store.slots import DESIRED_SUFFIXES, NO_DESIRED_SET, SLOT_SUFFIXES, Torn, unframe
from qmpnet.core.model import DiscardedRecord
from qmpnet.core.records import FORMAT_VERSION, MIGRATED_VERSIONS, DesiredSet, GuestRecord, migrated
from qmpnet.errors import StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "BOOT_ID_FILE",
    "RecordFiles",
    "Unreadable",
    "boot_time",
    "desired_paths",
    "json_object",
    "legacy_desired_path",
    "legacy_path",
    "load_any",
    "load_desired",
    "load_record",
    "mtime_of",
    "newest_desired",
    "newest_json",
    "read_boot_id",
    "read_desired_files",
    "read_or_discard",
    "read_record_files",
    "slot_paths",
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


def slot_paths(guests: Path, key: str) -> tuple[Path, ...]:
    """The slot files of the record of the guest ``key`` (:mod:`.slots`)."""
    return tuple(guests / f"{key}{suffix}" for suffix in SLOT_SUFFIXES)


def legacy_path(guests: Path, key: str) -> Path:
    """The single record file of a store written before the slots (read, migrated, then removed)."""
    return guests / f"{key}.json"


def desired_paths(guests: Path, key: str) -> tuple[Path, ...]:
    """The slot files of the desired set of the guest ``key`` (:mod:`.slots`)."""
    return tuple(guests / f"{key}{suffix}" for suffix in DESIRED_SUFFIXES)


def legacy_desired_path(guests: Path, key: str) -> Path:
    """The desired set's single file of a store written before its slots (read, migrated, then removed)."""
    return guests / f"{key}.desired.json"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StoreUnavailable(f"state_dir: cannot read {path} ({err.strerror or err})", field="state_dir") from err


def read_or_discard(
    path: Path, load: Callable[[bytes], _T], discarded: list[DiscardedRecord]
) -> _T | None:
    """``load`` of the file at ``path`` (``None``: no file); one that cannot be read is moved aside and reported."""
    raw = _read(path)
    if raw is None:
        return None
    try:
        return load(raw)
    except Unreadable as err:
        _discard(path, (path,), str(err), discarded)
        return None


@dataclass(frozen=True)
class RecordFiles(Generic[_T]):
    """What a record's or a desired set's slot files hold, and what the next write needs to know of them."""

    loaded: _T | None  # the record or the set (None: none, or moved aside)
    slot: int | None  # the slot it was read from (None: none, or the legacy file): the next write takes the other
    seq: int  # its write number (0: none)
    sizes: tuple[int | None, ...]  # each slot file's size (0: no file; None: moved aside, unknown)
    legacy: bool  # read from the legacy single file: write it to a slot, then remove the file


def read_record_files(
    guests: Path, key: str, load: Callable[[bytes, Path], _T], discarded: list[DiscardedRecord] | None
) -> RecordFiles[_T]:
    """The record of the guest ``key``: ``load`` (given the JSON and its file) of its newest complete slot.

    A torn slot (a write cut short by a kill) is passed over: the other slot, the write before it, is the record.
    With no complete slot, a legacy ``<key>.json`` (a store of an earlier qmpnet) is read instead. A record that
    cannot be used (``load`` raises :class:`Unreadable`, or every slot file is torn, which a kill cannot do) is moved
    aside, slot files and all, and reported once in ``discarded``; with ``discarded`` None (a reader that does not
    hold the guest's lock), no file is moved or removed and :class:`Unreadable` is raised.

    Raises:
        StoreUnavailable: A file cannot be read, or an unreadable one cannot be moved aside.
        Unreadable: With ``discarded`` None, the record cannot be used.
    """
    return _read_slots(slot_paths(guests, key), legacy_path(guests, key), load, discarded, "record")


def read_desired_files(guests: Path, key: str, discarded: list[DiscardedRecord] | None) -> RecordFiles[DesiredSet]:
    """The desired set of the guest ``key`` (``loaded`` None: none), as :func:`read_record_files` reads a record.

    Its legacy file is ``<key>.desired.json``, which an earlier qmpnet renamed into place at each write.

    Raises:
        StoreUnavailable: A file cannot be read, or an unreadable one cannot be moved aside.
        Unreadable: With ``discarded`` None, the set cannot be used.
    """
    legacy = legacy_desired_path(guests, key)
    return _read_slots(
        desired_paths(guests, key),
        legacy,
        lambda raw, path: None if path != legacy and raw == NO_DESIRED_SET else load_desired(raw),
        discarded,
        "desired set",
    )


def _read_slots(
    paths: Sequence[Path],
    legacy: Path,
    load: Callable[[bytes, Path], _T | None],
    discarded: list[DiscardedRecord] | None,
    what: str,
) -> RecordFiles[_T]:
    """What :func:`read_record_files` says, for the slot files ``paths`` and the single file ``legacy``."""
    raws = [_read(path) for path in paths]
    sizes = tuple(0 if raw is None else len(raw) for raw in raws)
    complete, torn = _unframed(raws)
    existing = [path for path, raw in zip(paths, raws, strict=True) if raw is not None]
    if complete:
        seq, slot, body = max(complete)
        try:
            loaded = load(body, paths[slot])
        except Unreadable as err:
            if discarded is None:
                raise
            _discard(paths[slot], existing, str(err), discarded)
            return RecordFiles(None, None, 0, (None,) * len(paths), legacy=False)
        for other, why in torn:
            log.info("state_dir: %s is torn (%s): a write cut short; the %s is the one before it, in %s",
                     paths[other], why, what, paths[slot].name)  # fmt: skip
        if discarded is not None:  # the lock's holder (a reader for tools changes nothing)
            legacy.unlink(missing_ok=True)  # a migration killed before it removed the file: the slots are newer
        return RecordFiles(loaded, slot, seq, sizes, legacy=False)
    if discarded is None:
        raw = _read(legacy)
        old = None if raw is None else load(raw, legacy)
    else:
        old = read_or_discard(legacy, lambda raw: load(raw, legacy), discarded)
    if old is not None:
        return RecordFiles(old, None, 0, sizes, legacy=True)
    if torn and not legacy.exists():
        # Only torn slots: no kill does that to both (one slot is written at a time); a single slot torn is the
        # first write of a guest, cut short (nothing was done yet). Either way there is nothing to read.
        reasons = "; ".join(f"{paths[slot].name}: {why}" for slot, why in torn)
        if discarded is None:
            raise Unreadable(f"no complete copy ({reasons})")
        _discard(existing[0], existing, f"no complete copy ({reasons})", discarded)
        return RecordFiles(None, None, 0, (None,) * len(paths), legacy=False)
    return RecordFiles(None, None, 0, sizes, legacy=False)


def _unframed(raws: Sequence[bytes | None]) -> tuple[list[tuple[int, int, bytes]], list[tuple[int, str]]]:
    """The complete slots (write number, slot, JSON) and the torn ones (slot, what is wrong) of ``raws``."""
    complete: list[tuple[int, int, bytes]] = []
    torn: list[tuple[int, str]] = []
    for slot, raw in enumerate(raws):
        if raw is None:
            continue
        try:
            seq, body = unframe(raw)
        except Torn as err:
            torn.append((slot, str(err)))
        else:
            complete.append((seq, slot, body))
    return complete, torn


def newest_json(guests: Path, key: str) -> bytes | None:
    """The JSON of the guest ``key``'s record as the next reader takes it (``None``: none), for tools and tests."""
    return read_record_files(guests, key, lambda body, _path: body, None).loaded


def newest_desired(guests: Path, key: str) -> DesiredSet | None:
    """The guest ``key``'s durable desired set as the next reader takes it (``None``: none), for tools and tests.

    Raises:
        Unreadable: It cannot be read or parsed.
    """
    return read_desired_files(guests, key, None).loaded


def _discard(path: Path, files: Sequence[Path], reason: str, discarded: list[DiscardedRecord]) -> None:
    """Move ``files`` (the record ``path`` and the files that go with it) aside, log it once and report it."""
    stamp = f"corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}"
    moved: list[Path] = []
    for each in files:
        aside = each.with_name(f"{each.name}.{stamp}")
        try:
            each.rename(aside)
        except OSError as failed:
            raise StoreUnavailable(
                f"state_dir: {path} cannot be read ({reason}) nor moved aside ({failed.strerror or failed})",
                field="state_dir",
            ) from failed
        moved.append(aside)
    aside = moved[list(files).index(path)]
    others = "".join(f" (and {each.name} as {a.name})" for each, a in zip(files, moved, strict=True) if each != path)
    log.warning("state_dir: %s cannot be read (%s): moved aside as %s%s; the guest is rebuilt from QEMU",
                path, reason, aside.name, others)
    discarded.append(DiscardedRecord(file=str(path), moved_to=str(aside), reason=reason))


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


def load_record(guests: Path, key: str, *, boot: str | None) -> GuestRecord | None:
    """The record of the guest ``key`` (``None``: none), without its desired set's file; nothing is moved aside.

    Raises:
        Unreadable: It cannot be read or parsed.
    """
    try:
        return read_record_files(
            guests, key, lambda raw, path: load_any(raw, boot=boot, mtime=mtime_of(path))[0], None
        ).loaded
    except StoreUnavailable as err:
        raise Unreadable(err.message) from err


def load_desired(raw: bytes) -> DesiredSet:
    """A desired set's JSON (a slot's body, or the legacy file), parsed.

    Raises:
        Unreadable: It cannot be parsed.
    """
    try:
        return DesiredSet.model_validate(json_object(raw))
    except ValidationError as err:
        raise Unreadable(
            f"not a valid desired set ({err.error_count()} errors: {err.errors(include_url=False)[0]['msg']})"
        ) from err

