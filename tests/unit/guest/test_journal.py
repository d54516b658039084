"""The journal's operation ids: what ``uuid.uuid4().hex`` gave, made without its ``UUID`` object."""

from __future__ import annotations

import re
import uuid

from qmpnet.guest.journal import new_operation


def test_an_operation_id_is_a_random_version_4_uuid_in_hex() -> None:
    ids = [new_operation() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for operation in ids:
        assert re.fullmatch(r"op-[0-9a-f]{32}", operation)
        parsed = uuid.UUID(hex=operation.removeprefix("op-"))
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == operation.removeprefix("op-")
    # Every other bit is random: each of the 122 takes both values across the ids.
    bits = [int(operation.removeprefix("op-"), 16) for operation in ids]
    fixed = {i for i in range(128) if len({(b >> i) & 1 for b in bits}) == 1}
    assert fixed == {76, 77, 78, 79, 62, 63}  # the version (0100) and variant (10) bits
