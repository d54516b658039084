"""Files of the state store: atomic, versioned JSON records and one advisory lock per guest.

A write goes to a temporary file in the same directory, is fsync'd, renamed over the record and the directory is
fsync'd: a reader (or a restart after a crash at any point) sees the old record or the new one, never a mix.
The lock is ``flock`` on a separate file: it dies with its process, so a killed holder never blocks the next
one, and it conflicts between any two open files, so two ``Guest`` objects in one process are kept apart too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import weakref
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Final

from pydantic import BaseModel, ValidationError

from qmpnet.core.records import FORMAT_VERSION, GuestRecord
from qmpnet.errors import Busy, InvalidRequest, Unsupported

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["FileGuestStore", "MemoryGuestStore", "StateDir", "canonical_address", "guest_key"]

log = logging.getLogger(__name__)

_KEY_CHARS: Final = re.compile(r"[^A-Za-z0-9_.-]+")
#: How often a waiter retries a held lock; the wait as a whole is bounded by the caller's timeout.
_LOCK_POLL: Final = 0.02


def guest_key(address: str) -> str:
    """The file name stem of the guest at QMP ``address``: readable, and unique by a hash of the address."""
    canonical = canonical_address(address)
    readable = _KEY_CHARS.sub("_", canonical).strip("_.")[-64:] or "guest"
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


def canonical_address(address: str) -> str:
    """A unix socket path made absolute and resolved; ``host:port`` as given."""
    if "/" in address or ":" not in address:
        return os.path.realpath(address)
    return address


class StateDir:
    """The state directory.

    Args:
        root: The directory (created with mode 0700 when missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.guests = root / "guests"

    @property
    def control_socket(self) -> Path:
        """Where a running ``qmpnet serve`` listens for local clients."""
        return self.root / "control.sock"

    def check(self) -> None:
        """Create the directory if needed and check that records can be written there.

        Raises:
            InvalidRequest: The directory cannot be created or written (the message says why, naming it).
        """
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.guests.mkdir(mode=0o700, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.guests, prefix=".probe-"):
                pass
        except OSError as err:
            reason = err.strerror or str(err)
            raise InvalidRequest(
                f"state_dir: {self.root} cannot be written ({reason}); set --state-dir or QMPNET_STATE_DIR to a "
                "writable directory",
                field="state_dir",
            ) from err

    async def open_guest(self, address: str, name: str, *, wait: float) -> FileGuestStore:
        """Lock the record of the guest at ``address`` and load it (a fresh one if there is none).

        Waits up to ``wait`` seconds for another qmpnet process holding the guest to let go.

        Raises:
            InvalidRequest: The state directory cannot be written.
            Busy: Another qmpnet process kept the guest for ``wait`` seconds.
            Unsupported: The record has another format version or cannot be read.
        """
        self.check()
        key = guest_key(address)
        lock = await _lock(
            self.guests / f"{key}.lock",
            wait,
            lambda pid, waited: f"guest {address}: another qmpnet process (pid {pid}) holds it; waited {waited:g} s",
        )
        try:
            path = self.guests / f"{key}.json"
            record = _load(path) or GuestRecord(address=canonical_address(address), name=name)
            if record.name != name:
                record = record.model_copy(update={"name": name})
        except BaseException:
            os.close(lock)
            raise
        return FileGuestStore(path, record, lock, key)

    async def lock_controller(self) -> int:
        """Hold the directory for one ``qmpnet serve`` (its control socket is the directory's own).

        Returns the lock's file descriptor, released when the process ends (or the fd is closed).

        Raises:
            Busy: Another ``qmpnet serve`` uses this state directory.
        """
        self.check()
        return await _lock(
            self.root / "serve.lock", 0, lambda pid, _: f"state_dir: another qmpnet serve (pid {pid}) uses {self.root}"
        )

    def records(self) -> list[GuestRecord]:
        """Every guest record in the directory (unreadable ones are logged and skipped)."""
        found = []
        for path in sorted(self.guests.glob("*.json")):
            try:
                record = _load(path)
            except Unsupported as err:
                log.warning("%s", err)
                continue
            if record is not None:
                found.append(record)
        return found


class FileGuestStore:
    """One guest's record, locked for this process until :meth:`close`.

    Writes are serialised (a thread lock: :meth:`save_async` writes in a worker thread) and numbered in the order
    they were asked for; a write that finds a later one already on disk has nothing left to do, since every record
    is built from the current one and so contains what the earlier ones did.
    """

    def __init__(self, path: Path, record: GuestRecord, lock_fd: int, key: str) -> None:
        self.path = path
        self.key = key
        self._record = record
        self._durable = record  # the newest record known to be on disk
        self._asked = 0  # writes asked for, numbered
        self._done = 0  # the number of the newest write on disk
        self._io = threading.Lock()
        self._lock_fd: int | None = lock_fd
        self._tmp = str(path.with_name(f".{path.stem}.tmp"))
        self._dir_fd: int | None = None

    @property
    def record(self) -> GuestRecord:
        """The record as last saved (or loaded); during :meth:`save_async`, the one being written."""
        return self._record

    def save(self, record: GuestRecord) -> None:
        """Write ``record`` durably and atomically, then make it the current one.

        The temporary file has a fixed name (``.<key>.tmp`` beside the record): only the holder of the guest's
        lock writes there. The directory stays open for the store's lifetime, for the ``fsync`` of the rename.

        Raises:
            InvalidRequest: The state directory can no longer be written (nothing was changed).
        """
        self._asked += 1
        self._write(encode_record(record), self._asked, record)
        self._record = record

    async def save_async(self, record: GuestRecord) -> None:
        """As :meth:`save`, with the disk work in a worker thread: the event loop serves other guests meanwhile.

        ``record`` is the current record at once (what is built on it next contains it); it is on disk when this
        returns.

        Raises:
            InvalidRequest: The state directory can no longer be written (the record is what it was, unless it
                was changed again meanwhile).
        """
        self._asked += 1
        data, number = encode_record(record), self._asked
        self._record = record
        try:
            await asyncio.to_thread(self._write, data, number, record)
        except InvalidRequest:
            if self._record is record:
                self._record = self._durable
            raise

    def _write(self, data: bytes, number: int, record: GuestRecord) -> None:
        with self._io:
            if number <= self._done:
                return  # a later record (built on this one) is on disk already
            tmp = self._tmp
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view) :]
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(tmp, self.path)  # noqa: PTH105 - the str paths of the hot path, no Path objects
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)  # noqa: PTH108 - as above
                    raise
                os.fsync(self._directory())
            except OSError as err:
                raise InvalidRequest(
                    f"state_dir: cannot write {self.path} ({err.strerror or err})", field="state_dir"
                ) from err
            self._done, self._durable = number, record

    def _directory(self) -> int:
        if self._dir_fd is None:
            self._dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._dir_fd

    def close(self) -> None:
        """Release the lock. Safe to call twice."""
        with self._io:  # a write in a worker thread finishes first
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class MemoryGuestStore:
    """A record kept in memory only: for unit tests and throw-away tools, never for a real guest."""

    def __init__(self, record: GuestRecord | None = None, *, key: str = "guest") -> None:
        self._record = record or GuestRecord(address="memory", name=key)
        self.key = key
        self.saves = 0

    @property
    def record(self) -> GuestRecord:
        """The record as last saved."""
        return self._record

    def save(self, record: GuestRecord) -> None:
        """Keep ``record``."""
        self._record = record
        self.saves += 1

    async def save_async(self, record: GuestRecord) -> None:
        """Keep ``record`` (as :meth:`save`)."""
        self.save(record)

    def close(self) -> None:
        """Nothing to release."""


#: The JSON of sub-records already encoded, by object (see encode_record): id -> (weak reference, JSON).
_FRAGMENTS: dict[int, tuple[weakref.ref[BaseModel], str]] = {}
_string: Final = encode_basestring_ascii  # a JSON string, quoted and escaped (json's own C encoder)
#: The fields of a GuestRecord encoded from fragments; every other field is encoded by pydantic.
_MAPPED: Final = ("nics", "operations")


def encode_record(record: GuestRecord) -> bytes:
    """``record`` as the JSON document of the record file, reusing what earlier writes encoded.

    Records are frozen, and a change copies only what it changes (``GuestRecord.with_nic`` and the like keep the
    other NICs', operations' and desired specs' objects), so between two writes of a guest nearly every
    ``NicRecord``, ``OperationRecord`` and desired ``NicSpec`` is the very same object; encoding them again was
    most of a write's CPU. The document is the one ``record.model_dump_json()`` gives, field order aside (a unit
    test compares them); the other fields, present and future, are pydantic's own encoding.
    """
    fields = [
        (name, "{" + ",".join(f"{_string(key)}:{_fragment(value)}" for key, value in getattr(record, name).items())
         + "}")
        for name in _MAPPED
    ]  # fmt: skip
    desired = record.desired
    if desired is None:
        fields.append(("desired", "null"))
    else:
        specs = "[" + ",".join(_fragment(spec) for spec in desired.nics) + "]"
        fields.append(("desired", _with(desired.model_dump_json(exclude={"nics"}), [("nics", specs)])))
    return _with(record.model_dump_json(exclude={*_MAPPED, "desired"}), fields).encode()


def _with(document: str, fields: list[tuple[str, str]]) -> str:
    """The JSON object ``document`` with ``fields`` (name, encoded value) added at its end."""
    added = ",".join(f"{_string(name)}:{value}" for name, value in fields)
    return f"{document[:-1]}{',' if document != '{}' else ''}{added}}}"


def _fragment(model: BaseModel) -> str:
    key = id(model)
    cached = _FRAGMENTS.get(key)
    if cached is not None and cached[0]() is model:
        return cached[1]
    text = model.model_dump_json()
    _FRAGMENTS[key] = (weakref.ref(model, functools.partial(_drop_fragment, key)), text)
    return text


def _drop_fragment(key: int, _gone: object) -> None:
    _FRAGMENTS.pop(key, None)


def _load(path: Path) -> GuestRecord | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise Unsupported(f"state_dir: cannot read {path} ({err.strerror or err})", field="state_dir") from err
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise Unsupported(f"state_dir: {path} is not valid JSON ({err}); move it aside", field="state_dir") from err
    version = data.get("version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise Unsupported(
            f"state_dir: {path} has format version {version!r}; this qmpnet reads version {FORMAT_VERSION}",
            field="state_dir",
        )
    try:
        return GuestRecord.model_validate(data)
    except ValidationError as err:
        raise Unsupported(f"state_dir: {path} is not a valid guest record ({err.error_count()} errors: "
                          f"{err.errors(include_url=False)[0]['msg']}); move it aside", field="state_dir") from err


async def _lock(path: Path, wait: float, busy: Callable[[str, float], str]) -> int:
    """Lock ``path`` within ``wait`` seconds, or raise ``Busy(busy(holder_pid, wait))``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await _wait_for_lock(fd, wait, busy)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _wait_for_lock(fd: int, wait: float, busy: Callable[[str, float], str]) -> None:
    deadline = time.monotonic() + wait
    while not _try_lock(fd):
        if time.monotonic() >= deadline:
            raise Busy(busy(os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown", wait))
        await asyncio.sleep(_LOCK_POLL)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True
