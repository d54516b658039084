"""Shaping a NIC's tap with tc through pyroute2: a rate limit both ways, netem impairment towards the guest.

What qmpnet puts on a shaped tap (egress of the tap = frames *to* the guest)::

    tap      root 71:       tbf RATE BURST            (rate only)
             root 71:       netem DELAY JITTER LOSS   (impairment only)
             root 71:       netem ... + 72: tbf as its child (both: delayed first, then rate-limited)
             ingress ffff:  u32 match-all -> mirred egress redirect to qmpifb<tap ifindex>     (rate only)
    qmpifb<N> root 71:      tbf RATE BURST            the guest's transmit direction

The guest's transmit direction arrives on the tap's *ingress*, where Linux can only police (drop above the rate)
or redirect. qmpnet redirects into an IFB device and shapes there with the same tbf: a policer makes TCP saw-tooth
well below the rate it is given, a queue does not (and the policer action is also the less common kernel option:
this project's CI kernel has IFB and mirred but no ``act_police``). netem applies only towards the guest, so a
ping's round trip grows by the delay once, as the API documents.

Ownership: the root qdiscs carry qmpnet's handles (``71:``, ``72:``), the IFB is named ``qmpifb<tap ifindex>`` and
marked ``qmpnet:ifb:<tap ifindex>:<tap name>`` (see :mod:`qmpnet.adapters.hostnet.links`). A tap whose root qdisc has
another handle, or that has an ingress qdisc without qmpnet's IFB, is someone else's: qmpnet refuses to touch it
(``conflict``). Removing the shaping deletes qmpnet's root qdisc (the kernel puts its default back), the ingress
qdisc (its filter goes with it) and the IFB.

A change is all or nothing: :func:`replace_layout` reads what is there, removes it, builds the new layout, and if
any step fails removes the half-built one and rebuilds the old before raising. The numbers are the kernel's
(bytes/s, bytes, microseconds, netem's 32-bit loss), read back from the dumps so that an undo restores exactly
what was there. Everything here runs in a namespace thread (:func:`qmpnet.adapters.hostnet.netns.run_in_netns`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pyroute2 import NetlinkError
from pyroute2.netlink.rtnl.tcmsg.common import tick_in_usec

from qmpnet.adapters.hostnet.failures import host_error, netlink_code
from qmpnet.adapters.hostnet.links import LinkInfo, dump_links, find_link, ifb_mark, parse_ifb_mark
from qmpnet.core.model import Shape
from qmpnet.errors import Conflict, QmpnetError, Unsupported

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "IFB_PREFIX",
    "ROOT",
    "TcLayout",
    "ifb_name",
    "layout_of",
    "read_layout",
    "replace_layout",
    "shape_of",
    "sweep_ifbs",
]

log = logging.getLogger(__name__)

#: qmpnet's qdisc handles: the root on the tap and the IFB, and the tbf under a netem root.
ROOT: Final = 0x710000
CHILD: Final = 0x720000
_TC_H_ROOT: Final = 0xFFFFFFFF
_INGRESS: Final = 0xFFFF0000
_INGRESS_PARENT: Final = 0xFFFFFFF1
_ETH_P_ALL: Final = 0x0003
IFB_PREFIX: Final = "qmpifb"
_U32_MAX: Final = 2**32 - 1
#: Default burst: 10 ms at the rate, and never less than this (a handful of full-size frames).
_MIN_DEFAULT_BURST: Final = 16 * 1024
#: netem's queue (packets) must hold what arrives during the delay; without a rate, assume a 1 Gbit/s link.
_NETEM_MIN_LIMIT: Final = 1000
_ASSUMED_LINK: Final = 125_000_000  # bytes/s
_FRAME: Final = 1500


@dataclass(frozen=True)
class TcLayout:
    """A tap's shaping in the kernel's units: what qmpnet writes, and what it reads back for an undo.

    Attributes:
        rate: tbf rate in bytes per second, or ``None`` for no rate limit.
        burst: tbf bucket in bytes.
        limit: tbf queue in bytes.
        delay: netem delay in microseconds.
        jitter: netem jitter in microseconds.
        loss: netem loss as the kernel keeps it (0 .. 2**32-1 for 0 .. 100 %).
        netem_limit: netem's queue in packets.
    """

    rate: int | None = None
    burst: int = 0
    limit: int = 0
    delay: int = 0
    jitter: int = 0
    loss: int = 0
    netem_limit: int = _NETEM_MIN_LIMIT

    @property
    def netem(self) -> bool:
        """Whether the layout needs netem (a delay or a loss)."""
        return bool(self.delay or self.loss)


def layout_of(shape: Shape | None, *, latency: float) -> TcLayout | None:
    """The kernel layout for ``shape``: default burst, tbf queue for ``latency`` seconds, netem queue.

    Returns ``None`` when the shape shapes nothing.
    """
    if shape is None:
        return None
    rate = shape.rate // 8 if shape.rate is not None else None
    burst = shape.burst if shape.burst is not None else max(_MIN_DEFAULT_BURST, rate // 100 if rate else 0)
    delay, jitter = shape.delay or 0, shape.jitter or 0
    loss = round((shape.loss or 0) / 100 * _U32_MAX)
    if rate is None and not (delay or loss):
        return None
    limit = min(_U32_MAX, math.ceil((rate or 0) * latency) + burst) if rate is not None else 0
    in_flight = (rate or _ASSUMED_LINK) * (delay + jitter) / 1_000_000 / _FRAME
    netem_limit = max(_NETEM_MIN_LIMIT, math.ceil(2 * in_flight))
    return TcLayout(rate, burst if rate else 0, limit, delay, jitter, loss, netem_limit)


def shape_of(layout: TcLayout | None) -> Shape | None:
    """The :class:`Shape` a layout read from the kernel stands for (rounded as tc prints it)."""
    if layout is None:
        return None
    values: dict[str, object] = {}
    if layout.rate is not None:
        values |= {"rate": layout.rate * 8, "burst": max(1600, layout.burst)}
    if layout.delay:
        values["delay"] = layout.delay
        if layout.jitter:
            values["jitter"] = layout.jitter
    if layout.loss:
        values["loss"] = round(layout.loss / _U32_MAX * 100, 4)
    return Shape.model_validate(values) if values else None


def ifb_name(tap: LinkInfo) -> str:
    """The IFB device that carries ``tap``'s guest-to-host direction: ``qmpifb<ifindex>``."""
    return f"{IFB_PREFIX}{tap.index}"


# ------------------------------------------------------------------------------------- in the namespace thread


def read_layout(ipr: Any, tap: LinkInfo) -> TcLayout | None:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    """What qmpnet's shaping on ``tap`` is now, or ``None`` when it has none.

    Raises:
        Conflict: The tap carries qdiscs qmpnet did not make.
    """
    qdiscs = {(int(m["parent"]), int(m["handle"])): m for m in ipr.get_qdiscs(tap.index) if m["index"] == tap.index}
    root = next((m for (parent, _), m in qdiscs.items() if parent == _TC_H_ROOT), None)
    has_ingress = any(parent == _INGRESS_PARENT for parent, _ in qdiscs)
    ifb = _our_ifb(ipr, tap)
    if root is not None and int(root["handle"]) not in (0, ROOT):
        raise Conflict(f"the NIC's tap {tap.name} has a {root.get_attr('TCA_KIND')} root qdisc qmpnet did not make; "
                       "remove it first", field="update.shape")
    if has_ingress and ifb is None:
        raise Conflict(f"the NIC's tap {tap.name} has an ingress qdisc qmpnet did not make; remove it first",
                       field="update.shape")
    if root is None or int(root["handle"]) != ROOT:
        return None
    kind = root.get_attr("TCA_KIND")
    if kind == "tbf":
        return _tbf(root, TcLayout())
    netem = _netem(root)
    child = qdiscs.get((ROOT | 1, CHILD))
    return _tbf(child, netem) if child is not None and child.get_attr("TCA_KIND") == "tbf" else netem


def replace_layout(ipr: Any, tap: LinkInfo, layout: TcLayout | None) -> TcLayout | None:  # noqa: ANN401
    """Make ``tap``'s shaping ``layout`` (``None``: none); all or nothing. Returns the layout that was there.

    Raises:
        Conflict: The tap carries qdiscs qmpnet did not make, or a link has the IFB's name.
        Unsupported: The kernel lacks tbf, netem, ifb or mirred.
        QmpnetError: Another netlink failure.
    """
    previous = read_layout(ipr, tap)
    if previous == layout:
        return previous
    _clear(ipr, tap)
    try:
        _build(ipr, tap, layout)
    except BaseException as err:
        _restore(ipr, tap, previous, err)
        raise
    return previous


def sweep_ifbs(ipr: Any, *, tap_name: str | None = None) -> list[str]:  # noqa: ANN401 - pyroute2's IPRoute
    """Delete qmpnet's IFB devices whose tap is gone (only those of ``tap_name``, if given); return their names."""
    links = dump_links(ipr)
    alive = {(link.index, link.name) for link in links}
    deleted = []
    for link in links:
        owner = parse_ifb_mark(link.alias)
        if owner is None or link.kind != "ifb" or owner in alive or (tap_name is not None and owner[1] != tap_name):
            continue
        try:
            ipr.link("del", index=link.index)
        except NetlinkError as err:
            if netlink_code(err) != errno.ENODEV:
                raise host_error(f"delete IFB {link.name}", err) from err
        deleted.append(link.name)
    return deleted


def _restore(ipr: Any, tap: LinkInfo, previous: TcLayout | None, cause: BaseException) -> None:  # noqa: ANN401
    try:
        _clear(ipr, tap)
        _build(ipr, tap, previous)
    except QmpnetError as err:
        log.warning("tap %s: restoring its old shaping failed too: %s", tap.name, err)
        cause.add_note(f"restoring the old shaping of {tap.name} failed too: {err}")


def _our_ifb(ipr: Any, tap: LinkInfo) -> LinkInfo | None:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    link = find_link(ipr, ifb_name(tap))
    if link is None or link.alias != ifb_mark(tap.index, tap.name):
        return None
    return link


def _clear(ipr: Any, tap: LinkInfo) -> None:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    for handle, parent in ((ROOT, _TC_H_ROOT), (_INGRESS, _INGRESS_PARENT)):
        try:
            ipr.tc("del", index=tap.index, handle=handle, parent=parent)
        except NetlinkError as err:
            if netlink_code(err) not in (errno.ENOENT, errno.EINVAL):  # nothing of ours there
                raise host_error(f"remove the shaping of {tap.name}", err, field="update.shape") from err
    ifb = _our_ifb(ipr, tap)
    if ifb is not None:
        try:
            ipr.link("del", index=ifb.index)
        except NetlinkError as err:
            if netlink_code(err) != errno.ENODEV:
                raise host_error(f"delete IFB {ifb.name}", err, field="update.shape") from err


def _build(ipr: Any, tap: LinkInfo, layout: TcLayout | None) -> None:  # noqa: ANN401 - pyroute2's IPRoute
    if layout is None:
        return
    if layout.netem:
        with _kernel_feature("netem", "delay, jitter and loss", "CONFIG_NET_SCH_NETEM, module sch_netem"):
            ipr.tc("add", "netem", tap.index, ROOT, parent=_TC_H_ROOT, delay=layout.delay, jitter=layout.jitter,
                   loss=_percent(layout.loss), limit=layout.netem_limit)
        if layout.rate is not None:
            _add_tbf(ipr, tap.index, CHILD, ROOT | 1, layout)
    elif layout.rate is not None:
        _add_tbf(ipr, tap.index, ROOT, _TC_H_ROOT, layout)
    if layout.rate is not None:
        ifb = _add_ifb(ipr, tap)
        _add_tbf(ipr, ifb.index, ROOT, _TC_H_ROOT, layout)
        _redirect(ipr, tap, ifb)


def _add_tbf(ipr: Any, index: int, handle: int, parent: int, layout: TcLayout) -> None:  # noqa: ANN401
    with _kernel_feature("tbf", "a rate", "CONFIG_NET_SCH_TBF, module sch_tbf"):
        ipr.tc("add", "tbf", index, handle, parent=parent, rate=layout.rate, burst=layout.burst, limit=layout.limit)


def _add_ifb(ipr: Any, tap: LinkInfo) -> LinkInfo:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    name = ifb_name(tap)
    try:
        with _kernel_feature("ifb", "a rate from the guest", "CONFIG_IFB, module ifb"):
            ipr.link("add", ifname=name, kind="ifb")
    except Conflict as err:
        raise Conflict(f"update.shape: a link called {name} exists and is not qmpnet's IFB device for tap "
                       f"{tap.name}; rename or delete it", field="update.shape") from err
    link = find_link(ipr, name)
    if link is None:
        raise QmpnetError(f"IFB {name} vanished right after it was created")
    try:
        ipr.link("set", index=link.index, ifalias=ifb_mark(tap.index, tap.name), state="up")
    except NetlinkError as err:
        raise host_error(f"bring IFB {name} up", err, field="update.shape") from err
    return link


def _redirect(ipr: Any, tap: LinkInfo, ifb: LinkInfo) -> None:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    with _kernel_feature("ingress", "a rate from the guest", "CONFIG_NET_SCH_INGRESS"):
        ipr.tc("add", "ingress", tap.index, _INGRESS)
    action = {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb.index}
    with _kernel_feature("u32 and mirred", "a rate from the guest", "CONFIG_NET_CLS_U32, CONFIG_NET_ACT_MIRRED"):
        ipr.tc("add-filter", "u32", tap.index, parent=_INGRESS, prio=1, protocol=_ETH_P_ALL, target=1,
               keys=["0x0/0x0+0"], action=[action])


@contextlib.contextmanager
def _kernel_feature(kind: str, purpose: str, config: str) -> Iterator[None]:
    """Turn the kernel's "no such qdisc, action or device kind" into ``unsupported`` naming the kernel option."""
    try:
        yield
    except NetlinkError as err:
        if netlink_code(err) in (errno.ENOENT, errno.EOPNOTSUPP):
            raise Unsupported(
                f"update.shape: this kernel has no {kind} ({config}), which {purpose} needs", field="update.shape"
            ) from err
        raise host_error(f"add {kind}", err, field="update.shape") from err


def _percent(loss: int) -> float:
    return loss / _U32_MAX * 100


def _options(msg: Any) -> Iterator[Any]:  # noqa: ANN401 - pyroute2's messages are untyped
    options = msg.get_attr("TCA_OPTIONS")
    if options is not None:
        yield options


def _tbf(msg: Any, base: TcLayout) -> TcLayout:  # noqa: ANN401 - pyroute2's messages are untyped
    for options in _options(msg):
        parms = options.get_attr("TCA_TBF_PARMS")
        if parms is not None:
            rate = int(parms["rate"])
            # tbf keeps the bucket as the time it takes to send it (ticks): burst = buffer / ticks-per-us * rate.
            burst = round(int(parms["buffer"]) / tick_in_usec * rate / 1_000_000) if rate else 0
            return TcLayout(rate, burst, int(parms["limit"]), base.delay, base.jitter, base.loss, base.netem_limit)
    return base


def _netem(msg: Any) -> TcLayout:  # noqa: ANN401 - pyroute2's messages are untyped
    for options in _options(msg):
        return TcLayout(
            delay=round(int(options["delay"]) / tick_in_usec),
            jitter=round(int(options["jitter"]) / tick_in_usec),
            loss=int(options["loss"]),
            netem_limit=int(options["limit"]),
        )
    return TcLayout()
