/** Wake paths and liveness: probes, hidden grace, offline, clock jumps, throttled timers. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { ORG, accept, event, rig, settle } from "./fake.js";

const pings = (s: { ofType(t: string): unknown[] }) => s.ofType("ping").length;

test("idle: an app-level ping; its pong keeps the socket", async () => {
  const r = rig();
  const s = await accept(r);
  r.timers.advance(24_000);
  assert.equal(pings(s), 0);
  r.timers.advance(1_000);
  assert.equal(pings(s), 1);
  r.timers.advance(20_000);
  assert.equal(r.sockets.length, 1);
  assert.equal(r.relay.status().state, "connected");
});

test("no pong within 3 s: the socket is dead, reconnect at once", async () => {
  const r = rig();
  const s = await accept(r);
  s.autoPong = false;
  r.timers.advance(25_000);
  assert.equal(pings(s), 1);
  r.timers.advance(3_000);
  await settle();
  assert.ok(s.closedByClient);
  assert.equal(r.sockets.length, 2);
  assert.match(r.relay.status().lastError!, /no pong/);
});

test("a throttled timer that fires late never kills a socket that answered", async () => {
  const r = rig();
  r.relay.subscribe(ORG, {});
  const s = await accept(r);
  s.autoPong = false;
  r.timers.advance(25_000); // ping sent
  r.timers.starve(2_000);
  s.frame(event(ORG, "C1")); // the socket is alive
  r.timers.starve(60_000); // the pong timeout fires a minute late
  r.timers.advance(1);
  await settle();
  assert.equal(r.sockets.length, 1);
  assert.ok(!s.closedByClient);
});

test("a clock jump (the machine slept) probes at once", async () => {
  const r = rig();
  const s = await accept(r);
  s.autoPong = false;
  r.timers.advance(4_000);
  r.clock.wallMs += 30 * 60_000; // asleep for half an hour: the wall clock jumped, not the monotonic one
  r.timers.advance(1_000); // the next sample
  assert.equal(pings(s), 1, "a ping right after the jump, not 25 s later");
  r.timers.advance(3_000);
  await settle();
  assert.equal(r.sockets.length, 2, "no pong: reconnected");
});

test("wake paths while the socket looks open: online, visible, pageshow, resume each probe", async () => {
  for (const ev of ["online", "visible", "wake"] as const) {
    const r = rig();
    const s = await accept(r);
    if (ev == "visible") r.page.fire("hidden");
    r.page.fire(ev);
    assert.equal(pings(s), 1, ev);
    r.timers.advance(3_000);
    assert.equal(r.sockets.length, 1, `${ev}: the pong kept it`);
    s.autoPong = false;
    if (ev == "visible") r.page.fire("hidden");
    if (ev == "online") r.page.fire("offline");
    r.page.fire(ev);
    r.timers.advance(3_000);
    await settle();
    assert.equal(r.sockets.length, 2, `${ev}: no pong, reconnected`);
  }
});

test("wake paths while closed: reconnect now instead of waiting out the backoff", async () => {
  for (const ev of ["online", "visible", "wake"] as const) {
    const r = rig();
    await accept(r);
    for (let i = 0; i < 6; i++) {
      r.sock().drop(1006);
      await settle();
      r.timers.advance(r.relay.status().retryAt! - r.clock.wallMs);
      await settle();
    }
    r.sock().drop(1006);
    assert.ok(r.relay.status().retryAt! - r.clock.wallMs >= 0);
    const n = r.sockets.length;
    if (ev == "visible") r.page.fire("hidden");
    r.page.fire(ev);
    await settle();
    assert.equal(r.sockets.length, n + 1, ev);
  }
});

test("offline: a probe, then 'offline' with no attempts until the browser is online", async () => {
  const r = rig();
  const s = await accept(r);
  s.autoPong = false;
  r.page.fire("offline"); // Safari in flight mode fires no close event
  assert.equal(pings(s), 1);
  r.timers.advance(3_000);
  await settle();
  assert.equal(r.relay.status().state, "offline");
  const n = r.sockets.length;
  r.timers.advance(600_000);
  assert.equal(r.sockets.length, n, "no attempts while offline");
  r.page.fire("online");
  await settle();
  assert.equal(r.sockets.length, n + 1);
  await accept(r);
  assert.equal(r.relay.status().state, "connected");
});

test("hidden longer than the grace: the socket closes; visible again: resume from the cursors", async () => {
  const r = rig({ hiddenGraceMs: 120_000 });
  r.relay.subscribe(ORG, {});
  const s = await accept(r);
  s.frame(event(ORG, "C7"));
  await settle();
  r.page.fire("hidden");
  r.timers.advance(119_000);
  assert.ok(!s.closedByClient);
  r.timers.advance(1_000);
  assert.ok(s.closedByClient, "closed for the battery");
  assert.equal(r.relay.status().state, "paused");
  r.timers.advance(3_600_000);
  assert.equal(r.sockets.length, 1, "nothing while hidden");
  r.page.fire("visible");
  const s2 = await accept(r);
  assert.equal(s2.ofType("subscribe")[0]!.cursor, "C7");
});

test("a page hidden for less than the grace keeps its socket", async () => {
  const r = rig({ hiddenGraceMs: 120_000 });
  const s = await accept(r);
  r.page.fire("hidden");
  r.timers.advance(60_000);
  r.page.fire("visible");
  r.timers.advance(120_000);
  assert.ok(!s.closedByClient);
});

test("connecting that hangs is given up after the connect timeout", async () => {
  const r = rig();
  await settle();
  assert.equal(r.sockets.length, 1);
  r.timers.advance(10_000); // never opened
  await settle();
  assert.ok(r.sockets[0]!.closedByClient);
  assert.equal(r.relay.status().state, "reconnecting");
});

test("per-org status: catching_up with replayed, then live; lag from created_at", async () => {
  const r = rig();
  r.relay.subscribe(ORG, {});
  const s = await accept(r);
  const created = new Date(r.clock.wallMs - 1_500).toISOString();
  s.frame(event(ORG, "A", { created_at: created }));
  s.frame(event(ORG, "A", { created_at: created }));
  await settle();
  let org = r.relay.machine.status().orgs[ORG]!;
  assert.equal(org.state, "catching_up");
  assert.equal(org.replayed, 2);
  assert.equal(org.lagMs, 1_500);
  s.frame({
    type: "subscribed",
    ref: s.ofType("subscribe")[0]!.ref,
    org: ORG,
    cursor: "B",
    replayed: 2,
  });
  await settle();
  org = r.relay.status().orgs[ORG]!;
  assert.equal(org.state, "live");
  assert.equal(org.replayed, 2);
});

test("forbidden: the org is surfaced and not resubscribed; rate_limited is retried", async () => {
  const r = rig();
  r.relay.subscribe(ORG, {});
  const s = await accept(r);
  s.frame({
    type: "error",
    ref: s.ofType("subscribe")[0]!.ref,
    code: "forbidden",
    message: "not a member",
  });
  assert.equal(r.relay.status().orgs[ORG]!.state, "forbidden");
  s.drop(1006);
  r.timers.advance(1_000);
  const s2 = await accept(r);
  assert.equal(s2.ofType("subscribe").length, 0);

  const q = rig();
  q.relay.subscribe(ORG, {});
  const t = await accept(q);
  t.frame({
    type: "error",
    ref: t.ofType("subscribe")[0]!.ref,
    code: "rate_limited",
    message: "slow down",
  });
  q.timers.advance(10_000);
  assert.equal(t.ofType("subscribe").length, 2);
});
