"""The topic scheme: building, parsing requests, and which Response Topics a controller accepts."""

from __future__ import annotations

import pytest

from qmpnet.api.wire.topics import RequestTopic, Topics, is_bus_name

TOPICS = Topics("qmpnet", "h1")


def test_state_and_event_topics() -> None:
    assert TOPICS.status == "qmpnet/h1/status"
    assert TOPICS.guest_status("vm1") == "qmpnet/h1/guest/vm1/status"
    assert TOPICS.guest_nics("vm1") == "qmpnet/h1/guest/vm1/nics"
    assert TOPICS.event("vm1", "nic_added") == "qmpnet/h1/guest/vm1/event/nic_added"
    assert TOPICS.request_filters == ("qmpnet/h1/guest/+/request/#", "qmpnet/h1/request/#")
    assert TOPICS.request("vm1", "nic/add") == "qmpnet/h1/guest/vm1/request/nic/add"
    assert TOPICS.request(None, "guests") == "qmpnet/h1/request/guests"
    assert TOPICS.response("vm1", "nic/add") == "qmpnet/h1/guest/vm1/response/nic/add"
    assert TOPICS.response(None, "guests") == "qmpnet/h1/response/guests"
    assert TOPICS.client_response("c-1") == "qmpnet/h1/client/c-1/response"


def test_a_deeper_root() -> None:
    topics = Topics("site/a/qmpnet", "h1")
    assert topics.status == "site/a/qmpnet/h1/status"
    assert topics.parse_request("site/a/qmpnet/h1/guest/vm1/request/nic/list") == RequestTopic("vm1", "nic/list")


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        ("qmpnet/h1/guest/vm1/request/nic/add", RequestTopic("vm1", "nic/add")),
        ("qmpnet/h1/guest/vm1/request/models", RequestTopic("vm1", "models")),
        ("qmpnet/h1/request/guests", RequestTopic(None, "guests")),
        ("qmpnet/h1/guest/vm1/request", None),
        ("qmpnet/h1/request", None),
        ("qmpnet/h2/request/guests", None),
        ("qmpnet/h1/guest/vm1/status", None),
        ("other/h1/request/guests", None),
    ],
)
def test_parse_request(topic: str, parsed: RequestTopic | None) -> None:
    assert TOPICS.parse_request(topic) == parsed


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("reply/to/me", True),
        ("qmpnet/h1/client/c-1/response", True),
        ("qmpnet/h1/guest/vm1/response/nic/add", True),
        ("qmpnet/h1/response/guests", True),
        ("qmpnet/h2/status", True),  # another controller's tree: the broker's ACL decides
        ("qmpnet/h1/status", False),
        ("qmpnet/h1/guest/vm1/status", False),
        ("qmpnet/h1/guest/vm1/nics", False),
        ("qmpnet/h1/guest/vm1/event/nic_added", False),
        ("qmpnet/h1/guest/vm1/request/nic/add", False),
        ("qmpnet/h1/guest/response/status", False),
        ("qmpnet/h1/request/guests", False),
        ("reply/+", False),
        ("reply/#", False),
        ("", False),
    ],
)
def test_may_answer_on(topic: str, allowed: bool) -> None:
    assert TOPICS.may_answer_on(topic) is allowed


@pytest.mark.parametrize(
    ("name", "valid"), [("vm1", True), ("a_b-C9", True), ("x" * 64, True), ("x" * 65, False), ("", False),
                        ("a/b", False), ("a+", False), ("a#", False), ("é", False), ("a b", False), ("h1.lab", False)],
)  # fmt: skip
def test_bus_names(name: str, valid: bool) -> None:
    assert is_bus_name(name) is valid
