/** Reconnect: the close-code table, full-jitter backoff, 1012 spread over a fleet. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { CLOSE_CODES } from "../../src/index.js";
import { closeRule } from "../../src/closecodes.js";
import { ORG, accept, rig, settle, type Rig } from "./fake.js";

/** Drop a connection that lived `upMs` with `code`; how long until the next socket opens (null: never). */
async function reconnectDelay(r: Rig, code: number, upMs = 20_000): Promise<number | null> {
  const s = await accept(r);
  r.timers.advance(upMs);
  const n = r.sockets.length;
  const t0 = r.clock.mono;
  s.drop(code);
  await settle();
  for (let i = 0; i < 400 && r.sockets.length == n; i++) {
    if (r.relay.status().state == "failed" || r.relay.status().state == "unauthorized") break;
    r.timers.advance(100);
    await settle();
  }
  return r.sockets.length > n ? r.clock.mono - t0 : null;
}

test("the close-code table: each code's behaviour", async () => {
  const expect: Record<number, { min: number; max: number } | "never"> = {
    1003: "never",
    1007: "never",
    1009: "never",
    4002: "never",
    4029: "never",
    4008: { min: 0, max: 0 }, // at once (after a stable connection)
    1011: { min: 0, max: 0 },
    4001: { min: 0, max: 0 }, // at once, with a new token
    1012: { min: 500, max: 5_000 },
    1013: { min: 0, max: 500 }, // full-jitter backoff, first attempt
    1006: { min: 0, max: 500 },
    1000: { min: 0, max: 500 },
  };
  for (const [code, want] of Object.entries(expect)) {
    for (let seed = 1; seed <= 5; seed++) {
      const r = rig({ seed });
      r.relay.subscribe(ORG, {});
      const d = await reconnectDelay(r, Number(code));
      const st = r.relay.status();
      if (want == "never") {
        assert.equal(d, null, `${code} must not reconnect`);
        assert.equal(st.state, "failed");
        assert.equal(st.closeCode, Number(code));
        assert.ok(st.lastError?.includes(String(code)));
        r.timers.advance(600_000);
        assert.equal(r.sockets.length, 1, `${code}: no loop`);
        r.relay.reconnect(); // by hand
        await settle();
        assert.equal(r.sockets.length, 2);
      } else {
        assert.ok(d !== null && d >= want.min && d <= want.max + 100, `${code}: ${d} ms`);
        const s = await accept(r);
        assert.equal(s.ofType("subscribe").length, 1, `${code}: resubscribed`);
      }
    }
  }
  // Every code the README lists is in the one table.
  for (const code of [1003, 1007, 1009, 1011, 1012, 1013, 4001, 4002, 4008, 4029])
    assert.ok(CLOSE_CODES[code], String(code));
  assert.equal(closeRule(1006)[0], "backoff");
});

test("4008 and 1011 right after connecting back off instead of looping", async () => {
  const r = rig();
  const d = await reconnectDelay(r, 4008, 1_000);
  assert.ok(d !== null && d <= 600);
  const d2 = await reconnectDelay(r, 4008, 1_000);
  assert.ok(d2 !== null && d2 <= 1_100);
  assert.equal(r.relay.status().attempt, 2);
});

test("full-jitter backoff: the ceiling doubles from 0.5 s to 30 s; reset after a stable period", async () => {
  const r = rig({ seed: 7 });
  await accept(r);
  r.sock().drop(1006);
  const delays: number[] = [];
  for (let attempt = 1; attempt <= 10; attempt++) {
    await settle();
    const st = r.relay.status();
    assert.equal(st.state, "reconnecting");
    assert.equal(st.attempt, attempt);
    const delay = st.retryAt! - r.clock.wallMs;
    const ceiling = Math.min(30_000, 500 * 2 ** (attempt - 1));
    assert.ok(delay >= 0 && delay <= ceiling, `attempt ${attempt}: ${delay} > ${ceiling}`);
    delays.push(delay);
    const n = r.sockets.length;
    r.timers.advance(delay + 1);
    await settle();
    assert.equal(r.sockets.length, n + 1);
    r.sock().drop(1006); // fails at once
  }
  assert.ok(Math.max(...delays.slice(6)) > 4_000, "the ceiling grew");
  await settle();
  r.timers.advance(30_000);
  await accept(r);
  r.timers.advance(10_000); // stable
  r.sock().drop(1006);
  await settle();
  assert.equal(r.relay.status().attempt, 1, "reset");
  assert.ok(r.relay.status().retryAt! - r.clock.wallMs <= 500);
});

test("1,000 clients after a 1012 spread out: no 100 ms bucket holds more than 5%", async () => {
  const at: number[] = [];
  for (let i = 0; i < 1000; i++) {
    const r = rig({ seed: 1000 + i });
    const s = await accept(r);
    r.timers.advance(20_000);
    s.drop(1012);
    const t0 = r.clock.mono;
    // Fire timers one by one until this client opens its next socket.
    for (let guard = 0; r.sockets.length == 1 && guard < 10; guard++) {
      r.timers.advance(r.timers.next! - r.clock.mono);
      await settle();
    }
    assert.equal(r.sockets.length, 2, "it reconnects");
    at.push(r.clock.mono - t0);
    r.relay.dispose();
  }
  assert.ok(
    Math.min(...at) >= 500 && Math.max(...at) <= 5_000,
    `${Math.min(...at)}..${Math.max(...at)}`,
  );
  const buckets = new Map<number, number>();
  for (const t of at) buckets.set(Math.floor(t / 100), (buckets.get(Math.floor(t / 100)) ?? 0) + 1);
  const worst = Math.max(...buckets.values());
  assert.ok(worst <= 50, `a 100 ms bucket holds ${worst} of 1000`);
  assert.ok(buckets.size >= 40, `only ${buckets.size} buckets used`);
});

test("status while reconnecting: attempt, retry time and the last error", async () => {
  const r = rig();
  const states: string[] = [];
  r.relay.onStatus((s) => states.push(s.state));
  assert.equal(r.relay.status().state, "connecting");
  await accept(r);
  r.sock().drop(1006);
  const st = r.relay.status();
  assert.equal(st.state, "reconnecting");
  assert.equal(st.attempt, 1);
  assert.equal(st.closeCode, 1006);
  assert.match(st.lastError!, /1006/);
  assert.ok(st.retryAt! >= r.clock.wallMs);
  assert.deepEqual([...new Set(states)], ["connected", "reconnecting"]);
});
