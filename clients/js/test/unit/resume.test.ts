/** Exact resume: delivery in order, cursors saved after the handler, repeats dropped, resync. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { safeStorage, memoryStorage, type CursorStorage } from "../../src/storage.js";
import { ORG, ORG2, URL_, accept, event, jwt, rig, settle } from "./fake.js";

const key = (user: string, org: string) => `pgrelay|${URL_}|${user}|${org}`;
const saved = (s: CursorStorage, user = "user-1", org = ORG) => s.getItem(key(user, org));

test("the first connect: token first, auth first frame, subscribe from the saved cursor", async () => {
  const storage = memoryStorage();
  storage.setItem(key("user-1", ORG), "C-saved");
  const r = rig({ storage });
  r.relay.subscribe(ORG, {});
  await settle();
  assert.equal(r.tokenCalls, 1);
  assert.equal(r.sockets.length, 1);
  assert.equal(r.sockets[0]!.url, URL_, "the token never travels in the URL");
  const s = await accept(r);
  assert.deepEqual(s.sent[0], { type: "auth", token: jwt("user-1", 1) });
  assert.deepEqual(s.sent[1], {
    type: "subscribe",
    ref: s.sent[1]!.ref,
    org: ORG,
    cursor: "C-saved",
  });
  assert.equal(r.relay.status().state, "connected");
  assert.equal(r.relay.status().orgs[ORG]!.state, "catching_up");
});

test("the cursor is saved only after the app's handler has finished", async () => {
  const r = rig();
  const release: (() => void)[] = [];
  const got: number[] = [];
  r.relay.subscribe(ORG, {
    onEvent: (e) => {
      got.push(e.id);
      return new Promise<void>((done) => release.push(done));
    },
  });
  const s = await accept(r);
  const [e1, e2] = [event(ORG, "C1"), event(ORG, "C2")];
  s.frame(e1);
  s.frame(e2);
  await settle();
  assert.deepEqual(got, [e1.id], "one at a time, in order");
  assert.equal(saved(r.storage), null, "nothing saved while the handler runs");
  release.shift()!();
  await settle();
  assert.equal(saved(r.storage), "C1");
  assert.deepEqual(got, [e1.id, e2.id]);
  release.shift()!();
  await settle();
  assert.equal(saved(r.storage), "C2");
});

test("a handler that throws is reported and counted as handled", async () => {
  const errors: unknown[] = [];
  const r = rig({ onError: (e) => errors.push(e) });
  r.relay.subscribe(ORG, {
    onEvent: () => {
      throw new Error("app bug");
    },
  });
  const s = await accept(r);
  s.frame(event(ORG, "C1"));
  await settle();
  assert.equal(errors.length, 1);
  assert.equal(saved(r.storage), "C1");
});

test("a resumed batch repeats ids: the app sees each once; an older cursor is what gets saved", async () => {
  const r = rig();
  const got: number[] = [];
  r.relay.subscribe(ORG, { onEvent: (e) => void got.push(e.id) });
  let s = await accept(r);
  const batch = [event(ORG, "P0"), event(ORG, "P0"), event(ORG, "P1")];
  for (const e of batch.slice(0, 2)) s.frame(e);
  await settle();
  assert.equal(saved(r.storage), "P0");
  s.drop(1006);
  r.timers.advance(600);
  s = await accept(r);
  assert.equal(s.ofType("subscribe")[0]!.cursor, "P0", "resumes from the last cursor received");
  for (const e of batch) s.frame(e); // the server repeats the batch in flight
  s.frame({
    type: "subscribed",
    ref: s.ofType("subscribe")[0]!.ref,
    org: ORG,
    cursor: "P1",
    replayed: 3,
  });
  const later = event(ORG, "P0"); // a live event may carry an OLDER cursor than one before
  s.frame(later);
  await settle();
  assert.deepEqual(got, [...batch.map((e) => e.id), later.id]);
  assert.equal(saved(r.storage), "P0", "the cursor of the event just handled, even if older");
  assert.equal(r.relay.status().orgs[ORG]!.state, "live");
});

test("a reload resumes from the cursor of the last event whose handler finished", async () => {
  const storage = memoryStorage();
  const a = rig({ storage });
  let hold!: () => void;
  a.relay.subscribe(ORG, {
    onEvent: (e) => (e.cursor == "P2" ? new Promise<void>((d) => (hold = d)) : undefined),
  });
  let s = await accept(a);
  const [e1, e2] = [event(ORG, "P1"), event(ORG, "P2")];
  s.frame(e1);
  s.frame(e2);
  await settle();
  assert.ok(hold);
  a.relay.dispose(); // the page is closed while the handler of e2 runs
  const b = rig({ storage });
  const seen: number[] = [];
  b.relay.subscribe(ORG, { onEvent: (e) => void seen.push(e.id) });
  s = await accept(b);
  assert.equal(s.ofType("subscribe")[0]!.cursor, "P1");
  s.frame(e2); // the server replays what follows P1
  await settle();
  assert.deepEqual(seen, [e2.id], "e2 reaches the app again: nothing is lost");
});

test("resync: onResync(org, reason) runs, then its fresh cursor is kept; the subscription stays", async () => {
  const r = rig();
  const calls: string[] = [];
  let finish!: () => void;
  r.relay.subscribe(ORG, {
    onResync: (org, reason) => {
      calls.push(`${org}:${reason}`);
      return new Promise<void>((d) => (finish = d));
    },
    onEvent: (e) => void calls.push(`event ${e.id}`),
  });
  const s = await accept(r);
  const ref = s.ofType("subscribe")[0]!.ref;
  s.frame({ type: "resync", org: ORG, reason: "cursor_expired", cursor: "FRESH" });
  s.frame({ type: "subscribed", ref, org: ORG, cursor: "FRESH", replayed: 0 });
  await settle();
  assert.deepEqual(calls, [`${ORG}:cursor_expired`]);
  assert.equal(r.relay.status().orgs[ORG]!.state, "resync");
  assert.equal(saved(r.storage), null);
  finish();
  await settle();
  assert.equal(saved(r.storage), "FRESH");
  assert.equal(r.relay.status().orgs[ORG]!.state, "live");
  const e = event(ORG, "AFTER");
  s.frame(e);
  await settle();
  assert.deepEqual(calls.at(-1), `event ${e.id}`);
});

test("cursors are kept per endpoint, user and org", async () => {
  const r = rig();
  r.relay.subscribe(ORG, {});
  r.relay.subscribe(ORG2, {});
  const s = await accept(r);
  s.frame(event(ORG, "A1"));
  s.frame(event(ORG2, "B1"));
  await settle();
  assert.equal(saved(r.storage, "user-1", ORG), "A1");
  assert.equal(saved(r.storage, "user-1", ORG2), "B1");
  assert.equal(saved(r.storage, "user-2", ORG), null);
  const other = rig({ storage: r.storage, url: "ws://elsewhere/v1" });
  other.relay.subscribe(ORG, {});
  const s2 = await accept(other);
  assert.equal(s2.ofType("subscribe")[0]!.cursor, null, "another endpoint starts fresh");
});

test("event_types: each handler sees only its globs", async () => {
  const r = rig();
  const jobs: string[] = [];
  const all: string[] = [];
  r.relay.subscribe(
    ORG,
    { onEvent: (e) => void jobs.push(e.event_type) },
    { eventTypes: ["job.*"] },
  );
  r.relay.subscribe(ORG, { onEvent: (e) => void all.push(e.event_type) });
  const s = await accept(r);
  assert.equal(s.ofType("subscribe")[0]!.event_types, undefined, "one handler wants everything");
  s.frame(event(ORG, "1", { event_type: "job.step.done" }));
  s.frame(event(ORG, "2", { event_type: "audit.appended" }));
  await settle();
  assert.deepEqual(jobs, ["job.step.done"]);
  assert.deepEqual(all, ["job.step.done", "audit.appended"]);
});

test("storage: localStorage that throws (Safari private mode) falls back to memory", () => {
  let reads = 0;
  const throwing: CursorStorage = {
    getItem: () => {
      reads++;
      return null;
    },
    setItem: () => {
      throw new DOMException("quota", "QuotaExceededError");
    },
    removeItem: () => {},
    length: 0,
    key: () => null,
  };
  const s = safeStorage(() => throwing);
  s.setItem("k", "v");
  assert.equal(s.getItem("k"), "v", "kept in memory");
  assert.equal(reads, 0, "memory from then on");
  const s2 = safeStorage(() => {
    throw new DOMException("denied", "SecurityError");
  });
  s2.setItem("k", "v2");
  assert.equal(s2.getItem("k"), "v2");
});

test("sign-out clears the token, the saved cursors and the subscriptions", async () => {
  const r = rig();
  r.storage.setItem("unrelated", "x");
  const got: number[] = [];
  r.relay.subscribe(ORG, { onEvent: (e) => void got.push(e.id) });
  const s = await accept(r);
  s.frame(event(ORG, "C1"));
  await settle();
  assert.equal(saved(r.storage), "C1");
  r.relay.signOut();
  assert.ok(s.closedByClient, "the socket is closed");
  assert.equal(saved(r.storage), null);
  assert.equal(r.storage.getItem("unrelated"), "x");
  assert.equal(r.relay.status().state, "idle");
  assert.deepEqual(r.relay.status().orgs, {});
  s.frame(event(ORG, "C2"));
  r.relay.start();
  const s2 = await accept(r);
  assert.equal(s2.ofType("subscribe").length, 0, "no subscription survives");
  assert.equal(r.tokenCalls, 2, "a new token for the next session");
  assert.equal(got.length, 1);
});
