"""WsConnection over real sockets: messages, limits, heartbeat, closing,
backpressure. trio-websocket is the client where it can be; RawClient
does what it cannot (fragments, invalid UTF-8, silence, reset)."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto.events import Ping, TextMessage

from relay.ws import SendResult, WsConnection, WsRequest, WsState, encode_text_frame
from tests.ws.support import FAST, RawClient, masked_frame, serving

pytestmark = pytest.mark.timeout(15)

OP_TEXT, OP_BINARY, OP_CONTINUATION = 0x1, 0x2, 0x0


async def hold_open(connection: WsConnection, request: WsRequest) -> None:
    """Read (so pings and closes are handled) and never send on its own."""
    while await connection.receive_message() is not None:
        pass


def close_of(closed: pytest.ExceptionInfo[ConnectionClosed]) -> tuple[int, str | None]:
    reason = closed.value.reason
    assert reason is not None
    return reason.code, reason.reason


async def close_code_seen_by(ws_url: str, *messages: str | bytes) -> int | None:
    async with open_websocket_url(ws_url) as ws:
        for message in messages:
            await ws.send_message(message)
        with pytest.raises(ConnectionClosed) as closed:
            with trio.fail_after(3):
                await ws.get_message()
        return close_of(closed)[0]


async def test_text_echo() -> None:
    async with serving() as served, open_websocket_url(served.url) as ws:
        for text in ["a", "é" * 1000, "x" * 4096]:
            await ws.send_message(text)
            assert await ws.get_message() == text


async def test_fragmented_message_is_reassembled() -> None:
    async with serving() as served:
        client = await RawClient.connect(served.port)
        await client.upgrade()
        await client.send_text("frag", fin=False)
        await client.send_event(Ping(b"in the middle"))
        await client.send_text("mé", fin=False)
        await client.send_text("nted", fin=True)
        events = [await client.next_event() for _ in range(2)]
        texts = [e.data for e in events if isinstance(e, TextMessage)]
        assert texts == ["fragménted"]
        client.close()


async def test_message_over_the_limit_closes_1009() -> None:
    async with serving() as served:
        assert await close_code_seen_by(served.url, "x" * 4097) == 1009
        assert served.connections[0].close_code == 1009


async def test_fragments_over_the_limit_close_1009() -> None:
    async with serving() as served:
        client = await RawClient.connect(served.port)
        await client.upgrade()
        for _ in range(5):
            await client.send_text("y" * 1000, fin=False)
        _, close, eof = await client.read_until_close()
        assert close is not None and close.code == 1009
        await client.send_event(close.response())
        assert eof
        client.close()


async def test_multibyte_text_is_counted_in_bytes() -> None:
    async with serving() as served:
        assert await close_code_seen_by(served.url, "é" * 2049) == 1009  # 4098 bytes


async def test_binary_message_closes_1003() -> None:
    async with serving() as served:
        assert await close_code_seen_by(served.url, b"\x00\x01") == 1003


async def test_receive_any_returns_binary() -> None:
    async def echo_any(connection: WsConnection, request: WsRequest) -> None:
        while (message := await connection.receive_any()) is not None:
            await connection.send_message(message)

    async with serving(echo_any) as served, open_websocket_url(served.url) as ws:
        await ws.send_message(b"\x00\xff")
        assert await ws.get_message() == b"\x00\xff"


async def test_invalid_utf8_closes_1007() -> None:
    async with serving() as served:
        client = await RawClient.connect(served.port)
        await client.upgrade()
        await client.send(masked_frame(OP_TEXT, b"ok \xff\xfe"))
        _, close, _ = await client.read_until_close()
        assert close is not None and close.code == 1007
        client.close()


async def test_client_ping_is_answered() -> None:
    async with serving(hold_open) as served, open_websocket_url(served.url) as ws:
        with trio.fail_after(2):
            await ws.ping(b"are you there")


async def test_heartbeat_closes_a_client_that_never_pongs() -> None:
    limits = dataclasses.replace(FAST, ping_interval_s=0.2, pong_timeout_s=0.3)
    async with serving(hold_open, limits=limits) as served:
        client = await RawClient.connect(served.port)
        await client.upgrade()
        started = trio.current_time()
        with trio.fail_after(3):
            events, close, eof = await client.read_until_close()
        assert any(isinstance(e, Ping) for e in events)
        assert close is not None and close.code == 1011
        assert 0.4 < trio.current_time() - started < 1.5
        assert eof  # the server closes after its close timeout even without a reply
        client.close()


async def test_heartbeat_keeps_a_client_that_pongs() -> None:
    limits = dataclasses.replace(FAST, ping_interval_s=0.1, pong_timeout_s=0.2)
    async with serving(limits=limits) as served, open_websocket_url(served.url) as ws:
        await trio.sleep(0.6)  # trio-websocket answers the server's pings
        await ws.send_message("still here")
        assert await ws.get_message() == "still here"
        assert served.connections[0].state is WsState.OPEN


async def test_close_delivers_queued_frames_then_the_code() -> None:
    frames = [encode_text_frame(f"frame {i:05d}".encode() + b"." * 200) for i in range(2000)]
    limits = dataclasses.replace(FAST, max_unsent_bytes=1 << 20)

    async def flood_then_close(connection: WsConnection, request: WsRequest) -> None:
        for frame in frames:
            assert connection.send_frame_nowait(frame).accepted
        assert connection.unsent_bytes > 0  # SO_SNDBUF is small: most of it is queued
        await connection.close(4008, "too slow")
        assert connection.state is WsState.CLOSED

    async with (
        serving(flood_then_close, limits=limits) as served,
        open_websocket_url(served.url, message_queue_size=0) as ws,
    ):
        received = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                received.append(await ws.get_message())
                if len(received) == 1:
                    await trio.sleep(0.2)  # let the backlog build up
        assert len(received) == len(frames)
        assert received[-1] == f"frame 01999{'.' * 200}"
        assert close_of(closed) == (4008, "too slow")


async def test_abort_from_another_task_closes_after_queued_frames() -> None:
    async with serving(hold_open) as served, open_websocket_url(served.url) as ws:
        await served.arrived.wait()
        connection = served.connections[0]
        for i in range(100):
            connection.send_frame_nowait(encode_text_frame(b"%d" % i))
        connection.abort(4008)  # sync, as the fan-out hub would
        assert connection.send_frame_nowait(b"late") is SendResult.CLOSED
        received = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                received.append(await ws.get_message())
        assert received == [str(i) for i in range(100)]
        assert close_of(closed)[0] == 4008


async def test_peer_close_is_echoed_and_ends_receive() -> None:
    seen: list[str | None] = []

    async def record(connection: WsConnection, request: WsRequest) -> None:
        seen.append(await connection.receive_message())
        seen.append(await connection.receive_message())

    async with serving(record) as served:
        async with open_websocket_url(served.url) as ws:
            await ws.send_message("last")
            await ws.aclose(4000, "bye")
            assert ws.closed is not None and ws.closed.code == 4000
        with trio.fail_after(2):
            await served.finished.wait()
        assert seen == ["last", None]
        assert served.connections[0].close_code == 4000


async def test_a_client_that_stops_reading_overflows_without_blocking_others() -> None:
    """The fan-out loop never awaits a client: a stalled one gets OVERFLOW once its
    pending bytes reach the limit, while a reading one receives everything."""
    limits = dataclasses.replace(FAST, max_unsent_bytes=64 * 1024, send_buffer_bytes=16 * 1024)
    async with serving(hold_open, limits=limits) as served:
        stalled = await RawClient.connect(served.port, rcvbuf=4096)
        await stalled.upgrade()
        await served.arrived.wait()
        served.arrived = trio.Event()
        async with open_websocket_url(served.url, message_queue_size=10_000) as reader:
            await served.arrived.wait()
            slow, fast = served.connections
            frame = encode_text_frame(b"e" * 1000)
            results: dict[SendResult, int] = dict.fromkeys(SendResult, 0)
            rounds = 1500
            for i in range(rounds):
                started = trio.current_time()
                results[slow.send_frame_nowait(frame)] += 1
                assert trio.current_time() - started < 0.05
                assert slow.unsent_bytes <= limits.max_unsent_bytes
                if not fast.send_frame_nowait(frame).accepted:
                    # only this test's own client lags (it shares our thread): let it catch up
                    await fast.wait_unsent_at_most(limits.max_unsent_bytes - len(frame))
                    assert fast.send_frame_nowait(frame).accepted
                if i % 10 == 0:
                    await trio.lowlevel.checkpoint()  # what a fan-out does every chunk
            assert results[SendResult.OVERFLOW] > 0
            assert results[SendResult.CLOSED] == 0
            with trio.fail_after(5):
                for _ in range(rounds):
                    assert len(await reader.get_message()) == 1000
        stalled.close()


async def test_drain_callback_runs_when_the_backlog_clears() -> None:
    drained = trio.Event()
    limits = dataclasses.replace(FAST, max_unsent_bytes=1 << 20, drain_low_water_bytes=1024)

    async def flood(connection: WsConnection, request: WsRequest) -> None:
        connection.set_drain_callback(drained.set)
        for _ in range(500):
            connection.send_frame_nowait(encode_text_frame(b"d" * 1000))
        assert connection.unsent_bytes > 1024
        await hold_open(connection, request)

    async with serving(flood, limits=limits) as served:
        client = await RawClient.connect(served.port, rcvbuf=4096)
        await client.upgrade()
        await served.arrived.wait()
        await trio.sleep(0.1)
        assert not drained.is_set()  # nobody reads yet
        with trio.fail_after(5):
            for _ in range(500):
                assert isinstance(await client.next_event(), TextMessage)
            await drained.wait()
        assert served.connections[0].unsent_bytes <= 1024
        client.close()


async def test_a_reset_with_a_backlog_never_raises_into_the_sender() -> None:
    limits = dataclasses.replace(FAST, max_unsent_bytes=1 << 20)
    async with serving(hold_open, limits=limits) as served:
        client = await RawClient.connect(served.port, rcvbuf=4096)
        await client.upgrade()
        await served.arrived.wait()
        connection = served.connections[0]
        frame = encode_text_frame(b"r" * 1000)
        while connection.send_frame_nowait(frame) is not SendResult.OVERFLOW:
            pass
        client.reset()
        with trio.fail_after(3):
            while (result := connection.send_frame_nowait(frame)) is not SendResult.CLOSED:
                assert result is SendResult.OVERFLOW or result.accepted
                await trio.sleep(0.01)
        with trio.fail_after(3):
            await served.finished.wait()  # its receive_message returned None
        assert connection.state is not WsState.OPEN
        assert connection.close_code == 1006
        assert connection.unsent_bytes == 0


async def test_handler_error_closes_1011_and_the_server_keeps_serving() -> None:
    async def broken(connection: WsConnection, request: WsRequest) -> None:
        if await connection.receive_message() == "boom":
            raise RuntimeError("handler bug")
        await connection.send_message("fine")

    async with serving(broken) as served:
        assert await close_code_seen_by(served.url, "boom") == 1011
        async with open_websocket_url(served.url) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "fine"


async def test_shutdown_closes_clients_with_1012_and_serve_returns() -> None:
    async with serving(hold_open) as served:
        async with open_websocket_url(served.url) as ws:
            await served.arrived.wait()
            with trio.fail_after(3):
                await served.server.shutdown(timeout_s=2)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert close_of(closed)[0] == 1012
        assert served.server.connection_count == 0
        with pytest.raises(OSError):
            await RawClient.connect(served.port)


async def test_send_message_waits_for_room_instead_of_overflowing() -> None:
    small = dataclasses.replace(FAST, max_unsent_bytes=8 * 1024, drain_low_water_bytes=0)
    done = trio.Event()

    async def producer(connection: WsConnection, request: WsRequest) -> None:
        for i in range(300):
            result = await connection.send_message(f"{i:04d}" + "p" * 996)
            assert result is not SendResult.OVERFLOW
            assert connection.unsent_bytes <= small.max_unsent_bytes
        done.set()
        await hold_open(connection, request)

    async with serving(producer, limits=small) as served, open_websocket_url(served.url) as ws:
        with trio.fail_after(5):
            for i in range(300):
                assert (await ws.get_message())[:4] == f"{i:04d}"
            await done.wait()


def _tasks_named(suffix: str) -> list[trio.lowlevel.Task]:
    found = []
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        assert task is not None
        if task.name.endswith(suffix):
            found.append(task)
        pending += [t for n in task.child_nurseries for t in n.child_tasks]
    return found


async def test_an_idle_connection_is_one_task_and_a_writer_runs_only_while_bytes_wait() -> None:
    """Per-connection memory: no writer task, nursery or heartbeat task while idle."""
    limits = dataclasses.replace(FAST, max_unsent_bytes=1 << 20, ping_interval_s=30.0)
    async with serving(hold_open, limits=limits) as served:
        clients = []
        for _ in range(3):
            client = await RawClient.connect(served.port, rcvbuf=4096)
            await client.upgrade()
            clients.append(client)
        await trio.testing.wait_all_tasks_blocked()
        assert len(served.connections) == 3
        connection_tasks = _tasks_named("._handle_client")
        assert len(connection_tasks) == 3
        assert all(not task.child_nurseries for task in connection_tasks)
        assert _tasks_named("._run_writer") == []
        assert len(_tasks_named(".run_heartbeats")) == 1

        connection = served.connections[0]
        frame = encode_text_frame(b"w" * 1000)
        sent = 0
        while connection.unsent_bytes == 0:
            assert connection.send_frame_nowait(frame).accepted
            sent += 1
        await trio.testing.wait_all_tasks_blocked()
        assert len(_tasks_named("._run_writer")) == 1
        with trio.fail_after(5):
            for _ in range(sent):
                assert isinstance(await clients[0].next_event(), TextMessage)
            await connection.wait_unsent_at_most(0)
        await trio.testing.wait_all_tasks_blocked()
        assert _tasks_named("._run_writer") == []
        assert connection.send_frame_nowait(frame) is SendResult.SENT
        for client in clients:
            client.close()


async def test_one_heartbeat_timer_pings_every_connection() -> None:
    limits = dataclasses.replace(FAST, ping_interval_s=0.1, pong_timeout_s=0.2)
    async with serving(limits=limits) as served:  # echo
        silent = []
        for _ in range(3):
            client = await RawClient.connect(served.port)
            await client.upgrade()
            silent.append(client)
        async with open_websocket_url(served.url) as answering:  # answers pings
            with trio.fail_after(3):
                for client in silent:
                    events, close, _ = await client.read_until_close()
                    assert any(isinstance(e, Ping) for e in events)
                    assert close is not None and close.code == 1011
            await answering.send_message("still here")
            assert await answering.get_message() == "still here"
        for client in silent:
            client.close()


async def test_one_write_past_the_bound_is_taken_when_nothing_waits() -> None:
    """An event stream frames its batch after `Output` sized it by the bound: the
    writer must take such a write when nothing waits (a refusal then would leave
    no drain to come, and the stream would stall), and refuse the next one."""
    limits = dataclasses.replace(
        FAST, max_unsent_bytes=8 * 1024, drain_low_water_bytes=1024, send_buffer_bytes=4096
    )
    async with serving(hold_open, limits=limits) as served:
        stalled = await RawClient.connect(served.port, rcvbuf=4096)
        await stalled.upgrade()
        await served.arrived.wait()
        (connection,) = served.connections
        big = encode_text_frame(b"b" * (3 * limits.max_unsent_bytes))
        assert connection.send_frame_nowait(big).accepted
        assert connection.unsent_bytes > limits.max_unsent_bytes  # the kernel took only part
        assert connection.send_frame_nowait(encode_text_frame(b"x")) is SendResult.OVERFLOW
        stalled.close()
