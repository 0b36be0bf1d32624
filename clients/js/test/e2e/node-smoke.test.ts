/** Node: the core with the `ws` package, against the real pgrelay serve. */
import assert from "node:assert/strict";
import { test } from "node:test";
import WebSocket from "ws";
import { createRelay, memoryStorage, type WebSocketClass } from "../../src/index.js";
import { WS_URL, emit, newOrg, skip, tableIds, token, until } from "./support.js";

test(
  "Node with ws: subscribe, receive, resume from the cursor after a restart",
  { skip },
  async () => {
    const org = newOrg();
    const storage = memoryStorage();
    const seen: number[] = [];
    const start = () => {
      const relay = createRelay({
        url: WS_URL,
        getToken: () => token(org),
        WebSocket: WebSocket as unknown as WebSocketClass,
        page: null,
        storage,
      });
      relay.subscribe(org, { onEvent: (e) => void seen.push(e.id) });
      return relay;
    };
    let relay = start();
    await until(() => relay.status().orgs[org]?.state == "live", 10_000, "live");
    const first = await emit(org, 10);
    await until(() => first.every((id) => seen.includes(id)), 10_000, "10 events");
    relay.dispose();
    const missed = await emit(org, 5); // the process is gone: these wait in the table
    relay = start();
    await until(() => missed.every((id) => seen.includes(id)), 10_000, "the missed 5 replayed");
    assert.deepEqual(seen, await tableIds(org), "every event once, in order");
    assert.equal(relay.status().orgs[org]!.state, "live");
    assert.ok(relay.status().orgs[org]!.lagMs! >= 0);
    relay.dispose();
  },
);
