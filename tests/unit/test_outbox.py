"""The output: direct path, bounded outbox, and the drain invariant."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.core.outbox import Outbox, OutboxLimits, Output, OutputLimits, PushResult
from relay.core.protocol import EventRow, encode_event, encode_pong
from tests.unit.support import Pipe, wrap

A = uuid.UUID(int=1)
B = uuid.UUID(int=2)


def row(id: int, org: uuid.UUID = A, entity_id: str = "42") -> EventRow:
    return EventRow(id, org, "job.updated", "job", entity_id, None, '{"n":1}', "t", id)


def push(box: Outbox, r: EventRow, now: float = 0.0, cursor: str | None = None) -> PushResult:
    cur = cursor or f"cur{r.id}"
    return box.push_event(r, cur, encode_event(r, cur), now)


def drain(box: Outbox) -> list[dict[str, Any]]:
    return [json.loads(f) for f in box.pop_ready(10**9)[0]]


def test_fifo_below_the_bound() -> None:
    box = Outbox()
    assert box.push_frame(encode_pong("1"), 0.0) is PushResult.QUEUED
    assert push(box, row(1)) is PushResult.QUEUED
    assert len(box) == 2 and box.pending_bytes > 0
    assert [f["type"] for f in drain(box)] == ["pong", "event"]
    assert len(box) == 0 and box.pending_bytes == 0


def test_pop_ready_batches_up_to_max_bytes_and_counts_events() -> None:
    box = Outbox()
    box.push_frame(encode_pong("p"), 0.0)
    for i in range(5):
        push(box, row(i, entity_id=str(i)))
    size = len(encode_event(row(0, entity_id="0"), "cur0"))
    frames, events = box.pop_ready(2 * size + 1)
    assert (len(frames), events) == (2, 1)  # the pong and one event
    assert box.pop_ready(1) == ([], 0)
    frames, events = box.pop_ready(1, at_least_one=True)
    assert (len(frames), events) == (1, 1)
    assert len(box) == 3


def test_overflow_first_coalesces_same_key_keeping_newest_with_count() -> None:
    box = Outbox(OutboxLimits(max_frames=3))
    push(box, row(1, entity_id="42"))
    push(box, row(2, entity_id="43"))
    push(box, row(3, entity_id="42"))
    assert push(box, row(4, entity_id="42")) is PushResult.COALESCED
    frames = drain(box)
    assert [(f["id"], f.get("coalesced", 1), f["cursor"]) for f in frames] == [
        (2, 1, "cur2"),
        (4, 3, "cur4"),
    ]


def test_overflow_collapses_an_org_into_a_single_resync_and_never_grows() -> None:
    limits = OutboxLimits(max_frames=10, max_overflows=100)
    box = Outbox(limits)
    results = []
    for i in range(50):
        results.append(push(box, row(i, A, entity_id=str(i))))
        assert len(box) <= limits.max_frames
        assert box.pending_bytes <= limits.max_bytes
    assert PushResult.RESYNCED in results
    frames = drain(box)
    # Once collapsed, later events of the org are absorbed into the queued resync:
    # the client refetches everything after it receives the resync anyway.
    assert frames == [{"type": "resync", "org": str(A), "reason": "overflow", "cursor": "cur49"}]


def test_events_after_the_resync_went_out_are_queued_again() -> None:
    box = Outbox(OutboxLimits(max_frames=3))
    for i in range(6):
        push(box, row(i, A, entity_id=str(i)))
    assert [f["type"] for f in drain(box)] == ["resync"]
    assert push(box, row(7, A, entity_id="7")) is PushResult.QUEUED
    assert [f["id"] for f in drain(box)] == [7]


def test_the_heaviest_org_is_collapsed_and_control_frames_survive() -> None:
    box = Outbox(OutboxLimits(max_frames=6))
    box.push_frame(encode_pong("p"), 0.0)
    push(box, row(1, B, "b1"))
    for i in range(2, 7):
        result = push(box, row(i, A, f"a{i}"))
    assert result is PushResult.RESYNCED
    frames = drain(box)
    assert [f["type"] for f in frames] == ["pong", "event", "resync"]
    assert frames[1]["org"] == str(B)
    assert frames[2] == {"type": "resync", "org": str(A), "reason": "overflow", "cursor": "cur6"}


def test_repeated_overflows_make_the_connection_hopeless() -> None:
    box = Outbox(OutboxLimits(max_frames=2, max_overflows=2, overflow_window_s=10.0))
    outcomes = [
        push(box, row(i, uuid.UUID(int=100 + i), str(i)), now=float(i) * 0.1) for i in range(12)
    ]
    assert PushResult.HOPELESS in outcomes
    # Beyond max_frames, only one resync per organization can be held (the caller
    # closes a hopeless connection, and subscriptions per connection are bounded).
    assert len(box) <= 2 + len({f["org"] for f in drain(box) if f["type"] == "resync"})


def test_overflows_outside_the_window_are_forgotten() -> None:
    box = Outbox(OutboxLimits(max_frames=2, max_overflows=1, overflow_window_s=1.0))
    outcomes = []
    for i in range(40):
        outcomes.append(push(box, row(i, A, str(i)), now=float(i) * 10))
        box.pop_ready(10**9) if i % 3 == 0 else None
    assert PushResult.HOPELESS not in outcomes


def test_only_control_frames_over_the_bound_is_hopeless() -> None:
    box = Outbox(OutboxLimits(max_frames=2))
    box.push_frame(encode_pong("1"), 0.0)
    box.push_frame(encode_pong("2"), 0.0)
    assert box.push_frame(encode_pong("3"), 0.0) is PushResult.HOPELESS
    assert len(box) == 2


@settings(max_examples=50)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["event", "pong", "pop"]),
            st.sampled_from([A, B, uuid.UUID(int=3)]),
            st.sampled_from(["1", "2", "3", "4"]),
        ),
        max_size=120,
    )
)
# Found by hypothesis: control frames fill the outbox and collapsing events into
# resyncs cannot make room; the bound must still hold.
@example(
    [("event", A, "1"), ("event", B, "1")]
    + [("pong", A, "1")] * 6
    + [("event", uuid.UUID(int=3), "1")]
)
def test_bounds_always_hold(ops: list[tuple[str, uuid.UUID, str]]) -> None:
    limits = OutboxLimits(max_frames=8, max_bytes=2000)
    box = Outbox(limits)
    for i, (op, org, entity) in enumerate(ops):
        if op == "event":
            push(box, row(i, org, entity), now=i * 0.01)
        elif op == "pong":
            box.push_frame(encode_pong(str(i)), i * 0.01)
        else:
            box.pop_ready(300)
        assert len(box) <= limits.max_frames
        assert box.pending_bytes <= limits.max_bytes
        assert box.pending_bytes == sum(len(e.frame) for e in box._entries)


# -- the output over a scripted socket --------------------------------------------


def output(pipe: Pipe, **limits: Any) -> Output:
    return Output(pipe, OutputLimits(transport_bytes=pipe.unsent_bound, **limits), wrap=wrap)


def event(out: Output, i: int, org: uuid.UUID = A, now: float = 0.0) -> bool:
    r = row(i, org, entity_id=str(i))
    return out.event(r, f"cur{i}", wrap(encode_event(r, f"cur{i}")), now)


def received_ids(pipe: Pipe) -> list[int]:
    return [f["id"] for f in pipe.frames() if f["type"] == "event"]


@pytest.mark.parametrize("kernel_bytes", [1 << 30, 5000, 0], ids=["takes all", "part", "none"])
def test_the_drain_invariant_holds_whatever_the_kernel_takes(kernel_bytes: int) -> None:
    """The outbox is not empty => the transport holds unsent bytes (so a drain follows)."""
    pipe = Pipe(kernel_bytes=kernel_bytes, unsent_bound=4096, low_water=1024)
    out = output(pipe, outbox=OutboxLimits(max_frames=10_000, max_bytes=1 << 30))
    pipe.on_drain = lambda: out.drained(0.0)
    for i in range(300):
        assert event(out, i)
        box = out._outbox
        assert not box or pipe.unsent_bytes > 0
    pipe.kernel_bytes = 1 << 30  # the client reads again
    pipe.read()
    assert received_ids(pipe) == list(range(300))
    assert out.backlog_bytes == 0 and out.stats.events_sent == 300


def test_a_drain_that_empties_the_transport_keeps_moving_the_outbox() -> None:
    # The stall of issue 8: the drain handed frames to a socket that took them all,
    # nothing was left unsent, nobody drained the outbox again.
    pipe = Pipe(kernel_bytes=0, unsent_bound=4096, low_water=1024)
    out = output(pipe, outbox=OutboxLimits(max_frames=10_000, max_bytes=1 << 30))
    for i in range(200):
        event(out, i)
    assert out._outbox and len(out._outbox) > 100
    pipe.kernel_bytes = 1 << 30
    pipe.kernel += pipe.unsent  # the writer flushed everything in one go ...
    pipe.unsent.clear()
    out.drained(1.0)  # ... and called back once: every queued frame must move on
    assert not out._outbox or pipe.unsent_bytes > 0
    pipe.on_drain = lambda: out.drained(2.0)
    pipe.read()
    assert received_ids(pipe) == list(range(200))


def test_the_output_counts_what_was_handed_to_the_socket_not_what_was_offered() -> None:
    pipe = Pipe(kernel_bytes=0, unsent_bound=2048)
    out = output(pipe, outbox=OutboxLimits(max_frames=3, max_bytes=1 << 20, max_overflows=99))
    for i in range(50):
        event(out, i, org=uuid.UUID(int=i % 2))
    handed = out.stats.events_sent
    assert handed < 50 and out.stats.outbox_overflows > 0
    pipe.kernel_bytes = 1 << 30
    pipe.on_drain = lambda: out.drained(1.0)
    pipe.read()
    assert out.stats.events_sent == len(received_ids(pipe)) < 50


def test_stalled_when_nothing_moved_for_too_long() -> None:
    pipe = Pipe(kernel_bytes=0, unsent_bound=4096)
    out = output(pipe, max_stall_s=30.0)
    assert not out.stalled(100.0) and out.stall_deadline() is None
    event(out, 1, now=100.0)  # nothing waited: the clock starts now
    assert out.stall_deadline() == 130.0
    assert not out.stalled(129.9) and out.stalled(130.0)
    out.drained(120.0)  # the socket made progress
    assert out.stall_deadline() == 150.0
    pipe.kernel_bytes = 1 << 30
    pipe.read()
    assert out.stall_deadline() is None and not out.stalled(1e9)


def test_a_stalled_client_is_hopeless_even_while_its_events_are_absorbed() -> None:
    pipe = Pipe(kernel_bytes=0, unsent_bound=1024)
    out = output(pipe, max_stall_s=5.0, outbox=OutboxLimits(max_frames=2))
    results = [event(out, i, now=0.0) for i in range(6)]
    assert all(results)  # collapsed into a resync, the client is not hopeless yet
    assert event(out, 10, now=1.0)
    assert not event(out, 11, now=6.0)


def test_corked_events_go_out_in_one_write_and_keep_their_order() -> None:
    pipe = Pipe()
    out = output(pipe)
    out.cork()
    for i in range(10):
        assert event(out, i)
    assert pipe.sends == 0 and out.stats.events_sent == 0  # held
    assert out.uncork(0.0) and pipe.sends == 1 and out.stats.events_sent == 10
    out.cork()
    event(out, 10)
    out.control(encode_pong("p"), 0.0)  # a control frame sends what was held first
    event(out, 11)
    out.uncork(0.0)
    pipe.read()
    frames = pipe.frames()
    assert [f.get("id", f["type"]) for f in frames] == [*range(11), "pong", 11]


def test_a_corked_batch_the_socket_refuses_queues_like_live_events() -> None:
    pipe = Pipe(kernel_bytes=0, unsent_bound=1024)
    out = output(pipe, outbox=OutboxLimits(max_frames=10_000, max_bytes=1 << 30))
    pipe.on_drain = lambda: out.drained(1.0)
    event(out, 0)  # fills what the transport may hold
    out.cork()
    for i in range(1, 50):
        event(out, i)
    assert out.uncork(0.0)
    pipe.kernel_bytes = 1 << 30
    pipe.read()
    assert received_ids(pipe) == list(range(50))
