"""Translating what the host says (``OSError``, pyroute2's ``NetlinkError``, a tool's exit status) into qmpnet errors.

The host-side libraries' exceptions never leak past this package: callers see the one error tree, with the
cause kept (``raise host_error(...) from err``). The split follows what a caller can do about it: a missing
thing is ``not_found``, something that already exists and is not ours is ``conflict``, a host that lacks a
module, a device node, a tool or a privilege is ``unsupported``, anything else is ``internal``.
"""

from __future__ import annotations

import errno
import os

from qmpnet.errors import Conflict, NotFound, QmpnetError, Unsupported

__all__ = ["host_error", "netlink_code"]

_MISSING = {errno.ENODEV, errno.ENOENT, errno.ENXIO}
_REFUSED = {errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT}


def netlink_code(err: BaseException) -> int | None:
    """The errno of an ``OSError`` or of pyroute2's ``NetlinkError`` (which keeps it in ``code``)."""
    code = getattr(err, "code", None)
    if isinstance(code, int):
        return code
    if isinstance(err, OSError):
        return err.errno
    return None


def host_error(what: str, err: BaseException, *, field: str | None = None) -> QmpnetError:
    """A qmpnet error for ``err`` raised while doing ``what`` (a phrase such as ``"create tap vnet%d"``).

    Returns the error; the caller raises it ``from err``.
    """
    code = netlink_code(err)
    reason = os.strerror(code) if code else str(err)
    message = f"{field}: {what}: {reason}" if field else f"{what}: {reason}"
    if code in _MISSING:
        return NotFound(message, field=field)
    if code in {errno.EEXIST, errno.EBUSY}:
        return Conflict(message, field=field)
    if code in _REFUSED:
        return Unsupported(f"{message} (qmpnet needs root or CAP_NET_ADMIN, and the kernel feature)", field=field)
    return QmpnetError(message, field=field)
