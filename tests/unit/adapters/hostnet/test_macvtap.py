"""How the kernel's answers to a macvtap request become qmpnet's errors (the working path: test_hostnet_qemu.py)."""

from __future__ import annotations

import errno

import pytest
from pyroute2 import NetlinkError

from qmpnet.adapters.hostnet.macvtap import _add_error, create_macvtap
from qmpnet.errors import Conflict, InvalidRequest, NotFound, QmpnetError, Unsupported


@pytest.mark.parametrize(
    ("code", "kind", "field"),
    [
        (errno.EOPNOTSUPP, Unsupported, "nic.backend.type"),  # a kernel without macvtap
        (errno.EBUSY, Conflict, "nic.backend.link"),  # passthru on a link that already has macvlans
        (errno.ENODEV, NotFound, "nic.backend.link"),
        (errno.EINVAL, QmpnetError, "nic.backend.link"),
    ],
)
def test_the_kernels_refusal_names_the_field(code: int, kind: type[QmpnetError], field: str) -> None:
    error = _add_error("eth0", NetlinkError(code))
    assert type(error) is kind
    assert error.field == field
    assert error.message.startswith(f"{field}: ")


def test_a_kernel_without_macvtap_says_so() -> None:
    assert "this kernel has no macvtap" in _add_error("eth0", NetlinkError(errno.EOPNOTSUPP)).message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"mode": "source"}, "nic.backend.mode"), ({"queues": 0}, "nic.queues"), ({"owner": "a b"}, "owner")],
)
async def test_bad_arguments_are_refused_before_any_netlink(kwargs: dict[str, object], field: str) -> None:
    arguments: dict[str, object] = {"mode": "bridge", "mac": "52:54:00:00:00:01", "netns": "qmpnet-no-such-ns"}
    with pytest.raises(InvalidRequest) as caught:
        await create_macvtap("eth0", **(arguments | kwargs))  # type: ignore[arg-type]
    assert caught.value.field == field
