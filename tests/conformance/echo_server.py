"""Echo server on relay.ws for the Autobahn|Testsuite (tests/conformance/run.sh).

Kept with the tests and never served by the daemon. It echoes text and binary
messages; its limits allow the 16 MiB messages of cases 9.* and turn the
heartbeat off (an unexpected ping would disturb the cases' exact frame
checks).

    python tests/conformance/echo_server.py --port 9001 [--host 127.0.0.1] [--port-file F]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from relay.ws import SendResult, WsConnection, WsLimits, WsRequest, WsServer

ECHO_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Autobahn 9.1.6 sends 16 MiB; leave room."""
ECHO_LIMITS = WsLimits(
    max_message_bytes=ECHO_MAX_MESSAGE_BYTES,
    max_unsent_bytes=ECHO_MAX_MESSAGE_BYTES + 16,
    drain_low_water_bytes=0,
    send_buffer_bytes=0,
    receive_chunk_bytes=64 * 1024,
    ping_interval_s=math.inf,
)


async def echo(connection: WsConnection, request: WsRequest) -> None:
    """Send every message back as it came (text as text, binary as binary)."""
    while (message := await connection.receive_any()) is not None:
        if await connection.send_message(message) is SendResult.CLOSED:
            return


async def main(host: str, port: int, port_file: str | None) -> None:
    server = WsServer(echo, limits=ECHO_LIMITS, path="/")
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, host, port)
        print(f"echo server listening on ws://{host}:{bound}/", flush=True)
        if port_file:
            tmp = f"{port_file}.tmp"
            await trio.Path(tmp).write_text(f"{bound}\n")
            os.replace(tmp, port_file)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, args.host, args.port, args.port_file)
