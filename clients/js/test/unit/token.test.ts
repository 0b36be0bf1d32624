/** Token before every connect, in-band refresh, one request at a time, stale results dropped. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { UnauthorizedError } from "../../src/index.js";
import { ORG, accept, jwt, rig, settle } from "./fake.js";

function deferred<T>() {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((a, b) => {
    resolve = a;
    reject = b;
  });
  return { promise, resolve, reject };
}

test("ahead of expires_at the token is refreshed in-band; the server's ready answers it", async () => {
  const r = rig();
  const s = await accept(r, 600); // a 10-minute token: refreshed 60 s before expiry
  r.timers.advance(539_000);
  assert.equal(r.tokenCalls, 1);
  r.timers.advance(1_000);
  await settle();
  assert.equal(r.tokenCalls, 2);
  assert.deepEqual(s.sent.at(-1), { type: "auth", token: jwt("user-1", 2) });
  s.frame({
    type: "ready",
    connection_id: "c1",
    expires_at: Math.floor(r.clock.wallMs / 1000) + 600,
  });
  r.timers.advance(10_000);
  assert.equal(r.sockets.length, 1, "the same socket");
  assert.equal(r.relay.status().state, "connected");
});

test("a refreshed auth that gets no ready within 3 s: the socket is dead, reconnect", async () => {
  const r = rig();
  await accept(r, 120);
  r.timers.advance(60_000);
  await settle();
  assert.equal(r.tokenCalls, 2);
  r.timers.advance(3_000);
  await settle();
  assert.equal(r.sockets.length, 2);
});

test("the first frame after a hidden tab wakes with an expired token carries the new token", async () => {
  // (a) the socket was closed while hidden (past the grace): reconnect with a new token.
  const a = rig({ hiddenGraceMs: 60_000 });
  a.relay.subscribe(ORG, {});
  await accept(a, 600);
  a.page.fire("hidden");
  a.timers.advance(60_000);
  assert.equal(a.relay.status().state, "paused");
  a.timers.starve(3_600_000); // an hour in the background: the token expired long ago
  a.page.fire("visible");
  await settle();
  const s = a.sock();
  s.accept();
  assert.deepEqual(s.sent[0], { type: "auth", token: jwt("user-1", a.tokenCalls) });
  assert.equal(a.tokenCalls, 2);

  // (b) the socket still looks open (throttled timers never fired): no ping before the new token.
  const b = rig({ hiddenGraceMs: 10 * 3_600_000 });
  const sb = await accept(b, 600);
  const before = sb.sent.length;
  b.page.fire("hidden");
  b.timers.starve(3_600_000);
  b.page.fire("visible");
  await settle();
  assert.equal(b.tokenCalls, 2);
  assert.deepEqual(sb.sent[before], { type: "auth", token: jwt("user-1", 2) });
});

test("ten concurrent triggers make one getToken call", async () => {
  const r = rig();
  const pending = deferred<string>();
  const s = await accept(r, 600);
  r.tokens = () => pending.promise;
  r.timers.advance(540_000); // the refresh timer
  r.page.fire("online");
  r.page.fire("wake");
  r.page.fire("hidden");
  r.page.fire("visible");
  r.page.fire("wake");
  r.clock.wallMs += 3_600_000; // a clock jump
  r.timers.advance(5_000);
  r.page.fire("online");
  r.page.fire("wake");
  r.relay.subscribe(ORG, {});
  await settle();
  assert.equal(r.tokenCalls, 2, "the first connect's, and one shared refresh");
  pending.resolve(jwt("user-1", "fresh"));
  await settle();
  assert.deepEqual(s.ofType("auth").at(-1), { type: "auth", token: jwt("user-1", "fresh") });
  assert.equal(s.ofType("auth").length, 2);
});

test("ten triggers while connecting also share one getToken call", async () => {
  const r = rig({ autoStart: false });
  const pending = deferred<string>();
  r.tokens = () => pending.promise;
  for (let i = 0; i < 4; i++) r.relay.start();
  for (let i = 0; i < 3; i++) r.page.fire("wake");
  for (let i = 0; i < 3; i++) r.page.fire("online");
  await settle();
  assert.equal(r.tokenCalls, 1);
  pending.resolve(jwt("user-1", "x"));
  await settle();
  assert.equal(r.sockets.length, 1);
});

test("a stale refresh result (its connection is gone) is ignored", async () => {
  const r = rig();
  const slow = deferred<string>();
  const s1 = await accept(r, 600);
  r.tokens = () => slow.promise;
  r.timers.advance(540_000); // refresh for connection 1 is in flight...
  await settle();
  assert.equal(r.tokenCalls, 2);
  s1.drop(4001); // ...and connection 1 ends: the server refused the token
  await settle();
  assert.equal(r.tokenCalls, 2, "one request at a time");
  r.tokens = (n) => jwt("user-1", n);
  slow.resolve(jwt("user-1", "stale"));
  await settle();
  assert.equal(r.tokenCalls, 3, "a fresh request for the new connection");
  r.timers.advance(600);
  const s2 = await accept(r);
  assert.deepEqual(s2.sent[0], { type: "auth", token: jwt("user-1", 3) });
  assert.ok(!s1.sent.some((f) => f.token === jwt("user-1", "stale")));
  assert.ok(!s2.sent.some((f) => f.token === jwt("user-1", "stale")));
});

test("a token that arrives after sign-out is never used", async () => {
  const r = rig({ autoStart: false });
  const slow = deferred<string>();
  r.tokens = () => slow.promise;
  r.relay.start();
  await settle();
  r.relay.signOut();
  slow.resolve(jwt("user-1", "old"));
  await settle();
  assert.equal(r.sockets.length, 0);
  assert.equal(r.relay.status().state, "idle");
});

test("null or an unauthorized error stops in unauthorized instead of looping", async () => {
  for (const give of [
    () => null,
    () => Promise.reject(new UnauthorizedError("signed out")),
    () => Promise.reject(Object.assign(new Error("HTTP 401"), { status: 401 })),
  ]) {
    const r = rig();
    r.tokens = give;
    await settle();
    r.timers.advance(600_000);
    await settle();
    assert.equal(r.relay.status().state, "unauthorized");
    assert.equal(r.tokenCalls, 1);
    assert.equal(r.sockets.length, 0);
    r.tokens = (n) => jwt("user-1", n);
    r.relay.reconnect(); // the user signed in again
    await accept(r);
    assert.equal(r.relay.status().state, "connected");
  }
});

test("getToken failing (network) backs off and tries again", async () => {
  const r = rig();
  r.tokens = () => Promise.reject(new Error("fetch failed"));
  await settle();
  const st = r.relay.status();
  assert.equal(st.state, "reconnecting");
  assert.match(st.lastError!, /fetch failed/);
  r.tokens = (n) => jwt("user-1", n);
  r.timers.advance(1_000);
  await accept(r);
  assert.equal(r.relay.status().state, "connected");
});

test("4001 reconnects only with a new token; the same token again is unauthorized", async () => {
  const r = rig();
  const s = await accept(r);
  r.timers.advance(20_000);
  s.drop(4001);
  await settle();
  assert.equal(r.tokenCalls, 2, "a new token at once");
  const s2 = await accept(r);
  assert.deepEqual(s2.sent[0], { type: "auth", token: jwt("user-1", 2) });

  r.tokens = () => jwt("user-1", 2); // the app keeps handing out the refused token
  r.timers.advance(20_000);
  s2.drop(4001);
  await settle();
  assert.equal(r.relay.status().state, "unauthorized");
  assert.equal(r.sockets.length, 2);
});

test("a refreshed token for another user reconnects (the server refuses a new sub in-band)", async () => {
  const r = rig();
  r.relay.subscribe(ORG, {});
  const s = await accept(r, 600);
  r.tokens = () => jwt("user-2", 9);
  r.timers.advance(540_000);
  await settle();
  assert.ok(s.closedByClient);
  assert.equal(r.sockets.length, 2);
  const s2 = await accept(r);
  assert.deepEqual(s2.sent[0], { type: "auth", token: jwt("user-2", 9) });
  assert.equal(s2.ofType("subscribe")[0]!.cursor, null, "user-2 has cursors of its own");
});

test("the client never logs, and no status carries the token", async () => {
  const logged: unknown[] = [];
  const methods = ["log", "info", "warn", "error", "debug"] as const;
  const saved = methods.map((m) => console[m]);
  for (const m of methods) console[m] = (...a: unknown[]) => void logged.push(a);
  try {
    const r = rig();
    const statuses: string[] = [];
    r.relay.onStatus((st) => statuses.push(JSON.stringify(st)));
    r.relay.subscribe(ORG, {});
    let s = await accept(r, 600);
    s.frame({ type: "error", ref: null, code: "bad_request", message: "nope" });
    s.drop(4001);
    await settle();
    s = await accept(r, 600);
    r.timers.advance(540_000);
    await settle();
    s.drop(1003);
    await settle();
    assert.equal(r.relay.status().state, "failed");
    assert.deepEqual(logged, []);
    for (let n = 1; n <= r.tokenCalls; n++)
      for (const st of statuses) assert.ok(!st.includes(jwt("user-1", n).split(".")[2]!));
    assert.ok(statuses.length > 3);
  } finally {
    methods.forEach((m, i) => (console[m] = saved[i]!));
  }
});
