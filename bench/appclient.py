"""App-level clients: what an application sees, not what the socket sees.

Each process runs one asyncio loop holding protocol-v1 clients built the way an
app would build them: the `websockets` library (PyPI) with its defaults, and
`json.loads` on every frame. A client's latency sample is `time.time()` taken
right after it parsed an event, minus the `ts` the publisher put in the
payload (its clock just before the INSERT). So the sample includes everything
between the commit and the app: the relay, the kernel, the library's frame
parsing and UTF-8 check, JSON, and this process's own queueing when many of
its clients become readable at once (50 per process at 100 clients).

The orchestrator (bench.run) drives a process through a multiprocessing pipe:
commands are (name, args) tuples and each gets one reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from array import array
from typing import Any

from bench.loadgen import raise_nofile


class App:
    def __init__(self, pipe: Any, proc_id: int, host: str, port: int, secret: str) -> None:
        self.pipe = pipe
        self.proc_id = proc_id
        self.url = f"ws://{host}:{port}/v1"
        self.secret = secret
        self.samples = array("d")
        self.events = 0
        self.errors: dict[str, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.live = 0
        self.done = asyncio.Event()

    def note(self, key: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1

    async def client(self, sub: str, org: str, ready: asyncio.Future[bool]) -> None:
        from websockets.asyncio.client import connect

        from relay.server.jwt import mint_token

        token = mint_token(self.secret, orgs=[org], sub=sub, lifetime_s=3600)
        try:
            async with connect(self.url) as ws:
                await ws.send(json.dumps({"type": "auth", "token": token}))
                msg = json.loads(await ws.recv())
                if msg.get("type") != "ready":
                    raise RuntimeError(f"auth: {msg}")
                await ws.send(
                    json.dumps({"type": "subscribe", "ref": "1", "org": org, "cursor": None})
                )
                msg = json.loads(await ws.recv())
                if msg.get("type") != "subscribed":
                    raise RuntimeError(f"subscribe: {msg}")
                self.live += 1
                ready.set_result(True)
                async for raw in ws:
                    msg = json.loads(raw)
                    now = time.time()
                    if msg.get("type") == "event":
                        self.events += 1
                        ts = msg.get("payload", {}).get("ts")
                        if ts:
                            self.samples.append(now - ts)
                    else:
                        self.note("frame:" + str(msg.get("type")))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.note(type(exc).__name__ + ": " + str(exc)[:80])
            if not ready.done():
                ready.set_result(False)
        finally:
            if ready.done() and ready.result():
                self.live -= 1

    async def open(self, count: int, org: str, prefix: str) -> dict[str, Any]:
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        readies = []
        for i in range(count):
            fut: asyncio.Future[bool] = loop.create_future()
            task = loop.create_task(self.client(f"{prefix}-p{self.proc_id}-{i}", org, fut))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            readies.append(fut)
        ok = 0
        if readies:
            done = await asyncio.wait_for(asyncio.gather(*readies), timeout=60)
            ok = sum(done)
        return {"live": ok, "seconds": round(time.monotonic() - t0, 3), "errors": self.errors}

    async def close_all(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=10)

    async def command(self, name: str, args: dict[str, Any]) -> bool:
        if name == "open":
            reply: Any = await self.open(int(args["count"]), args["org"], args["prefix"])
        elif name == "reset":
            self.samples = array("d")
            self.events = 0
            reply = {"live": self.live}
        elif name == "samples":
            reply = {
                "samples": self.samples.tobytes(),
                "events": self.events,
                "live": self.live,
                "errors": dict(self.errors),
            }
        elif name == "close_all":
            await self.close_all()
            reply = {"closed": True}
        elif name == "exit":
            await self.close_all()
            self.pipe.send({"bye": True})
            return False
        else:
            reply = {"error": f"unknown command {name}"}
        self.pipe.send(reply)
        return True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        loop.add_reader(self.pipe.fileno(), lambda: queue.put_nowait(self.pipe.recv()))
        while True:
            name, args = await queue.get()
            if not await self.command(name, args):
                return


def app_main(pipe: Any, proc_id: int, host: str, port: int, secret: str) -> None:
    raise_nofile()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(App(pipe, proc_id, host, port, secret).run())
