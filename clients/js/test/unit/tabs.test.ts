/** One connection per browser: a leader tab's socket fans out; another tab takes over. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { memoryStorage } from "../../src/storage.js";
import { createSharedRelay, type LocksLike, type SharedRelay } from "../../src/tabs.js";
import {
  FakeClock,
  FakePage,
  FakeSocket,
  FakeTimers,
  ORG,
  ORG2,
  URL_,
  event,
  jwt,
  settle,
} from "./fake.js";

/** navigator.locks for one origin: exclusive, granted in request order, released with the tab. */
class FakeLocks implements LocksLike {
  private held = new Set<string>();
  private queue: { name: string; cb: () => Promise<void>; done: (v: unknown) => void }[] = [];
  request(name: string, cb: () => Promise<void>) {
    return new Promise((done) => {
      this.queue.push({ name, cb, done });
      this.pump(name);
    });
  }
  private pump(name: string) {
    if (this.held.has(name)) return;
    const i = this.queue.findIndex((q) => q.name == name);
    if (i < 0) return;
    const [q] = this.queue.splice(i, 1);
    this.held.add(name);
    void q!.cb().then((v) => {
      this.held.delete(name);
      q!.done(v);
      this.pump(name);
    });
  }
}

/** BroadcastChannel delivery is a macrotask: let a few rounds pass. */
async function rounds(n = 5) {
  for (let i = 0; i < n; i++) await settle();
}

function browser() {
  const clock = new FakeClock(3);
  const timers = new FakeTimers(clock);
  const storage = memoryStorage();
  const locks = new FakeLocks();
  const sockets: FakeSocket[] = [];
  let tokens = 0;
  class WS extends FakeSocket {
    constructor(url: string) {
      super(url);
      sockets.push(this);
    }
  }
  const name = "test-" + Math.random();
  const tab = () => {
    const page = new FakePage();
    const seen: Record<string, number[]> = {};
    const relay = createSharedRelay({
      url: URL_,
      getToken: () => jwt("user-1", ++tokens),
      WebSocket: WS,
      clock,
      timers,
      storage,
      locks,
      page,
      channel: new BroadcastChannel(name) as never,
    });
    const follow = (org: string) =>
      relay.subscribe(org, { onEvent: (e) => void (seen[org] ??= []).push(e.id) });
    return { relay, page, seen, follow };
  };
  return { clock, timers, storage, sockets, tab };
}

async function ready(s: FakeSocket, clock: FakeClock) {
  s.accept();
  s.frame({ type: "ready", connection_id: "c", expires_at: clock.wallMs / 1000 + 3600 });
  await rounds();
}

test("three tabs share one socket; events reach every tab that follows the org", async () => {
  const b = browser();
  const [A, B, C] = [b.tab(), b.tab(), b.tab()];
  A.follow(ORG);
  B.follow(ORG);
  C.follow(ORG2);
  await rounds();
  assert.deepEqual([A.relay.role, B.relay.role, C.relay.role], ["leader", "follower", "follower"]);
  assert.equal(b.sockets.length, 1);
  const s = b.sockets[0]!;
  await ready(s, b.clock);
  const orgs = s.ofType("subscribe").map((f) => f.org);
  assert.deepEqual(new Set(orgs), new Set([ORG, ORG2]));
  const es = [1, 2, 3].map((i) => event(ORG, "C" + i));
  const f = event(ORG2, "D1");
  for (const e of [...es, f]) s.frame(e);
  await rounds();
  assert.deepEqual(
    A.seen[ORG],
    es.map((e) => e.id),
  );
  assert.deepEqual(
    B.seen[ORG],
    es.map((e) => e.id),
  );
  assert.deepEqual(C.seen[ORG2], [f.id]);
  assert.equal(C.seen[ORG], undefined);
  for (const t of [A, B, C]) assert.equal(t.relay.status().state, "connected");
  assert.deepEqual(Object.keys(C.relay.status().orgs), [ORG2]);
  for (const t of [A, B, C]) t.relay.dispose();
});

test("the leader's tab closes: another takes over at once, resumes from the cursor, loses nothing", async () => {
  const b = browser();
  const [A, B, C] = [b.tab(), b.tab(), b.tab()];
  for (const t of [A, B, C]) t.follow(ORG);
  await rounds();
  const s1 = b.sockets[0]!;
  await ready(s1, b.clock);
  const before = [1, 2, 3].map((i) => event(ORG, "C" + i));
  for (const e of before) s1.frame(e);
  await rounds();
  // The server sent two more, but the leader's tab is closed before it reads them.
  const lost = [event(ORG, "C3"), event(ORG, "C4")];
  A.relay.dispose();
  s1.drop(1006);
  await rounds();
  assert.equal(B.relay.role, "leader");
  assert.equal(C.relay.role, "follower");
  assert.equal(b.sockets.length, 2);
  const s2 = b.sockets[1]!;
  await ready(s2, b.clock);
  assert.equal(
    s2.ofType("subscribe")[0]!.cursor,
    "C3",
    "the cursor saved after the last handled event",
  );
  for (const e of [before[2]!, ...lost]) s2.frame(e); // the replay repeats one
  const after = event(ORG, "C5");
  s2.frame(after);
  await rounds();
  const all = [...before, ...lost, after].map((e) => e.id);
  assert.deepEqual(B.seen[ORG], all);
  assert.deepEqual(C.seen[ORG], all);
  for (const t of [B, C]) t.relay.dispose();
});

test("the socket stays open while any tab is visible; wake in a follower probes the leader's socket", async () => {
  const b = browser();
  const [A, B] = [b.tab(), b.tab()];
  await rounds();
  const s = b.sockets[0]!;
  await ready(s, b.clock);
  A.page.fire("hidden");
  await rounds();
  b.timers.advance(10 * 60_000);
  assert.ok(!s.closedByClient, "B is visible");
  B.page.fire("hidden");
  await rounds();
  b.timers.advance(3 * 60_000);
  assert.ok(s.closedByClient, "every tab hidden past the grace");
  B.page.fire("visible");
  await rounds();
  assert.equal(b.sockets.length, 2, "a follower coming back reconnects the leader");
  const s2 = b.sockets[1]!;
  await ready(s2, b.clock);
  const pings = s2.ofType("ping").length;
  B.page.fire("wake");
  await rounds();
  assert.equal(s2.ofType("ping").length, pings + 1);
  for (const t of [A, B]) t.relay.dispose();
});

test("sign-out in one tab signs out every tab", async () => {
  const b = browser();
  const [A, B] = [b.tab(), b.tab()];
  A.follow(ORG);
  B.follow(ORG);
  await rounds();
  const s = b.sockets[0]!;
  await ready(s, b.clock);
  s.frame(event(ORG, "C9"));
  await rounds();
  assert.equal(b.storage.length, 1);
  B.relay.signOut();
  await rounds();
  assert.ok(s.closedByClient);
  assert.equal(b.storage.length, 0);
  assert.deepEqual(A.relay.status().orgs, {});
  for (const t of [A, B]) t.relay.dispose();
});

test("without Web Locks each tab is on its own", async () => {
  const sockets: FakeSocket[] = [];
  class WS extends FakeSocket {
    constructor(url: string) {
      super(url);
      sockets.push(this);
    }
  }
  const clock = new FakeClock();
  const relays: SharedRelay[] = [0, 1].map(() =>
    createSharedRelay({
      url: URL_,
      getToken: () => jwt("u", 1),
      WebSocket: WS,
      clock,
      timers: new FakeTimers(clock),
      page: null,
      locks: null,
    }),
  );
  await rounds();
  assert.deepEqual(
    relays.map((r) => r.role),
    ["solo", "solo"],
  );
  assert.equal(sockets.length, 2);
  relays.forEach((r) => r.dispose());
});
