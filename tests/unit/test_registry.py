"""The fan-out index: which connection follows which org."""

from __future__ import annotations

import uuid

from relay.core.registry import Registry

A = uuid.UUID(int=1)
B = uuid.UUID(int=2)


def test_add_fan_out_and_remove() -> None:
    reg: Registry[str, str] = Registry()
    reg.add("c1", A, "s1")
    reg.add("c2", A, "s2")
    reg.add("c1", B, "s3")
    assert dict(reg.subscribers(A)) == {"c1": "s1", "c2": "s2"}
    assert reg.subscribers(uuid.UUID(int=9)) == ()
    assert len(reg) == 3 and sorted(reg.followers()) == ["c1", "c2"]
    assert reg.remove("c1", A) is True
    assert reg.remove("c1", A) is False
    assert dict(reg.subscribers(A)) == {"c2": "s2"}
    assert reg.remove_connection("c1") == 1
    assert reg.subscribers(B) == () and len(reg) == 1 and reg.followers() == ["c2"]
    assert reg.remove_connection("c1") == 0


def test_add_replaces_a_connections_previous_entry() -> None:
    reg: Registry[int, str] = Registry()
    reg.add(1, A, "old")
    reg.add(1, A, "new")
    assert reg.subscribers(A) == ((1, "new"),)
    assert len(reg) == 1


def test_fan_out_snapshot_is_cached_and_safe_to_mutate_under() -> None:
    reg: Registry[int, str] = Registry()
    for conn in range(5):
        reg.add(conn, A, "r")
    fanout = reg.subscribers(A)
    assert reg.subscribers(A) is fanout
    for conn, _ in fanout:
        reg.remove_connection(conn)  # e.g. closing a slow client mid-loop
    assert reg.subscribers(A) == () and len(reg) == 0
