"""Micro-benchmark of the fan-out path (not collected by pytest).

    python tests/ws/bench_fanout.py [--clients 1000] [--messages 200] [--size 300]

A child process opens N raw WebSocket clients that read and discard
everything. The server encodes each message once, offers it to every client
with `send_frame_nowait`, and checkpoints every FANOUT_CHUNK sends, as the
hub does. It prints the server's CPU time per delivered message and the
Python heap per idle connection (tracemalloc).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
import tracemalloc
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from relay.ws import SendResult, WsConnection, WsRequest, WsServer, encode_text_frame

FANOUT_CHUNK = 2000


def client_process(port: int, clients: int, expect_bytes: int) -> None:
    """Open `clients` connections and read until each got `expect_bytes` (roughly)."""

    async def one(done: trio.Semaphore) -> None:
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        await sock.send(
            (
                f"GET /v1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        got = 0
        while data := await sock.recv(65536):
            before, got = got, got + len(data)
            if before < expect_bytes <= got:
                done.release()
        sock.close()

    async def main() -> None:
        done = trio.Semaphore(0, max_value=clients)
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one, done)
            for _ in range(clients):
                await done.acquire()
            nursery.cancel_scope.cancel()

    trio.run(main)


async def bench(clients: int, messages: int, size: int) -> None:
    connections: list[WsConnection] = []
    all_in = trio.Event()

    async def handler(connection: WsConnection, request: WsRequest) -> None:
        connections.append(connection)
        if len(connections) == clients:
            all_in.set()
        while await connection.receive_message() is not None:
            pass

    tracemalloc.start()
    server = WsServer(handler)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        heap_before = tracemalloc.get_traced_memory()[0]
        frame = encode_text_frame(b"x" * size)
        child = await trio.lowlevel.open_process(
            [
                sys.executable,
                __file__,
                "--clients-for",
                str(port),
                "--clients",
                str(clients),
                "--expect",
                str(len(frame) * messages),
            ]
        )
        with trio.fail_after(60):
            await all_in.wait()
        await trio.sleep(0.5)
        heap = tracemalloc.get_traced_memory()[0] - heap_before
        tracemalloc.stop()
        results = dict.fromkeys(SendResult, 0)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        budget = FANOUT_CHUNK
        for i in range(messages):
            frame = encode_text_frame(b"%08d" % i + b"x" * (size - 8))
            for connection in connections:
                results[connection.send_frame_nowait(frame)] += 1
                budget -= 1
                if budget <= 0:
                    budget = FANOUT_CHUNK
                    await trio.lowlevel.checkpoint()
        for connection in connections:  # the writers flush what the first send() left
            await connection.wait_pending_at_most(0)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        sends = messages * clients
        print(
            f"clients={clients} messages={messages} size={size}B: "
            f"{cpu / sends * 1e6:.2f} us CPU per delivered message, "
            f"{sends / wall:,.0f} messages/s wall, "
            f"results={ {k.value: v for k, v in results.items()} }"
        )
        print(f"python heap per idle connection: {heap / clients / 1024:.1f} KiB (tracemalloc)")
        await child.wait()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--clients-for", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients_for:
        client_process(args.clients_for, args.clients, args.expect)
    else:
        trio.run(bench, args.clients, args.messages, args.size)
