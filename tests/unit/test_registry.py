"""Subscription registry and event-type filters."""

from __future__ import annotations

import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.protocol import is_valid_event_glob
from relay.core.registry import Registry, Subscription, glob_matches

A = uuid.UUID(int=1)
B = uuid.UUID(int=2)


def test_add_fan_out_and_remove() -> None:
    reg: Registry[str] = Registry()
    s1, s2, s3 = Subscription("1"), Subscription("2"), Subscription("3")
    assert reg.add("c1", A, s1) is None
    reg.add("c2", A, s2)
    reg.add("c1", B, s3)
    assert dict(reg.subscribers(A)) == {"c1": s1, "c2": s2}
    assert reg.subscribers(uuid.UUID(int=9)) == ()
    assert (len(reg), reg.org_count, reg.connection_count) == (3, 2, 2)
    assert reg.get("c1", B) is s3 and A in reg
    assert reg.remove("c1", A) is s1
    assert reg.remove("c1", A) is None
    assert dict(reg.subscribers(A)) == {"c2": s2}
    assert reg.remove_connection("c1") == {B: s3}
    assert B not in reg and reg.orgs() == [A]
    assert (len(reg), reg.org_count, reg.connection_count) == (1, 1, 1)
    assert reg.remove_connection("c1") == {}


def test_add_replaces_a_connections_previous_subscription() -> None:
    reg: Registry[int] = Registry()
    old, new = Subscription("1"), Subscription("2")
    reg.add(1, A, old)
    assert reg.add(1, A, new) is old
    assert reg.subscribers(A) == ((1, new),)
    assert len(reg) == 1


def test_fan_out_snapshot_is_cached_and_safe_to_mutate_under() -> None:
    reg: Registry[int] = Registry()
    for conn in range(5):
        reg.add(conn, A, Subscription("r"))
    fanout = reg.subscribers(A)
    assert reg.subscribers(A) is fanout
    for conn, _sub in fanout:
        reg.remove_connection(conn)  # e.g. closing a slow client mid-loop
    assert reg.subscribers(A) == () and len(reg) == 0


@pytest.mark.parametrize(
    ("globs", "event_type", "expected"),
    [
        (None, "anything.at.all", True),
        (("*",), "job", True),
        (("job.*",), "job.updated", True),
        (("job.*",), "job.step.done", True),
        (("job.*",), "job", False),
        (("job.*",), "jobs.updated", False),
        (("*.created",), "job.created", True),
        (("*.created",), "a.b.created", True),
        (("*.created",), "created", False),
        (("job.updated",), "job.updated", True),
        (("job.updated",), "job.updated.x", False),
        (("job.*.done",), "job.a.b.done", True),
        (("job.*.done",), "job.done", False),
        (("a.b", "c.*"), "c.d", True),
        (("a.b", "c.*"), "a.c", False),
    ],
)
def test_event_type_filters(globs: tuple[str, ...] | None, event_type: str, expected: bool) -> None:
    sub = Subscription("1", globs)
    assert sub.matches(event_type) is expected
    assert sub.matches(event_type) is expected  # cached verdict agrees
    assert sub.filtered is (globs is not None and "*" not in globs)


def test_hostile_globs_do_not_backtrack() -> None:
    glob = ".".join(["*"] * 40 + ["x"])
    assert is_valid_event_glob(glob[:128])
    sub = Subscription("1", (glob,))
    started = time.perf_counter()
    assert not sub.matches(".".join(["a"] * 200))
    assert time.perf_counter() - started < 0.1


def test_verdict_cache_is_bounded() -> None:
    sub = Subscription("1", ("job.*",))
    for i in range(1000):
        assert sub.matches(f"job.t{i}")
    assert len(sub._verdicts) <= 256


def test_coalescing_subscription_has_a_window() -> None:
    assert Subscription("1").coalescer is None
    sub = Subscription("1", coalesce_ms=250)
    assert sub.coalescer is not None and sub.coalescer.window_s == 0.25


segments = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=6)


def reference_match(glob: list[str], parts: list[str]) -> bool:
    if not glob:
        return not parts
    if glob[0] == "*":
        return any(reference_match(glob[1:], parts[i:]) for i in range(1, len(parts) + 1))
    return bool(parts) and parts[0] == glob[0] and reference_match(glob[1:], parts[1:])


@given(st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=5), segments)
def test_glob_matcher_agrees_with_a_reference(glob: list[str], parts: list[str]) -> None:
    assert glob_matches(tuple(glob), parts) is reference_match(glob, parts)
