/** Invalidation: the seed's routing, batching and dedupe, resync, hidden pages; TanStack Query for real. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { QueryClient, QueryObserver } from "@tanstack/react-query";
import { createInvalidator, router, type QueryKey } from "../../src/invalidate.js";
import { tanstackInvalidator } from "../../src/tanstack-query.js";
import { swrKeyMatches } from "../../src/swr.js";
import type { EventFrame } from "../../src/protocol.js";
import { FakeClock, FakeTimers, ORG, ORG2, event } from "./fake.js";

/** The seed's web parity: what each event makes stale. */
const seed = router({
  "job.*": (e) => ["jobs", e.org],
  "evidence.uploaded": (e) => [
    ["jobs", e.org],
    ["job", e.org, String(e.payload.job_id), "documents"],
  ],
  "audit.appended": (e) => ["audit", e.org],
});

const ev = (type: string, extra: Record<string, unknown> = {}) =>
  event(ORG, "c", { event_type: type, ...extra }) as EventFrame;

test("the router: job.* -> jobs list; evidence.uploaded -> jobs list and that job's documents", () => {
  assert.deepEqual(seed(ev("job.created")), [["jobs", ORG]]);
  assert.deepEqual(seed(ev("job.step.done")), [["jobs", ORG]]);
  assert.deepEqual(seed(ev("evidence.uploaded", { payload: { job_id: 42 } })), [
    ["jobs", ORG],
    ["job", ORG, "42", "documents"],
  ]);
  assert.deepEqual(seed(ev("audit.appended")), [["audit", ORG]]);
  assert.deepEqual(seed(ev("billing.paid")), []);
});

function rig(hidden = false) {
  const clock = new FakeClock();
  const timers = new FakeTimers(clock);
  const calls: QueryKey[][] = [];
  const orgCalls: string[] = [];
  let onVisible: (() => void) | null = null;
  const page = {
    isHidden: hidden,
    hidden: () => page.isHidden,
    onVisible: (f: () => void) => {
      onVisible = f;
      return () => {};
    },
    show() {
      page.isHidden = false;
      onVisible?.();
    },
  };
  const inv = createInvalidator({
    route: seed,
    invalidate: (k) => void calls.push(k),
    invalidateOrg: (o) => void orgCalls.push(o),
    timers,
    page,
  });
  return { inv, timers, calls, orgCalls, page };
}

test("ten updates of one job within the window make one invalidation of one key", () => {
  const r = rig();
  for (let i = 0; i < 10; i++) {
    r.inv.event(ev("job.updated", { entity_id: "7" }));
    r.timers.advance(4);
  }
  assert.equal(r.calls.length, 0, "collected, not yet invalidated");
  r.timers.advance(46);
  assert.deepEqual(r.calls, [[["jobs", ORG]]], "50 ms after the last one");
  r.inv.event(ev("evidence.uploaded", { payload: { job_id: 7 } }));
  r.timers.advance(50);
  assert.deepEqual(r.calls[1], [
    ["jobs", ORG],
    ["job", ORG, "7", "documents"],
  ]);
});

test("a steady stream is still invalidated at least every 250 ms", () => {
  const r = rig();
  for (let i = 0; i < 30; i++) {
    r.inv.event(ev("job.updated", { entity_id: String(i % 3) }));
    r.timers.advance(30);
  }
  assert.equal(r.calls.length, 3, "at 250, 500 and 750 ms");
  r.timers.advance(50);
  assert.equal(r.calls.length, 4);
});

test("resync invalidates everything of that org, and its keys are not invalidated twice", () => {
  const r = rig();
  r.inv.event(ev("job.updated"));
  r.inv.event(event(ORG2, "c", { event_type: "job.updated" }) as EventFrame);
  r.inv.resync(ORG);
  r.timers.advance(50);
  assert.deepEqual(r.orgCalls, [ORG]);
  assert.deepEqual(r.calls, [[["jobs", ORG2]]]);
});

test("keys collected while hidden flush once on return", () => {
  const r = rig(true);
  for (let i = 0; i < 5; i++) r.inv.event(ev("job.updated", { entity_id: String(i) }));
  r.inv.event(ev("audit.appended"));
  r.timers.advance(60_000);
  assert.equal(r.calls.length, 0);
  r.page.show();
  assert.deepEqual(r.calls, [
    [
      ["jobs", ORG],
      ["audit", ORG],
    ],
  ]);
  r.timers.advance(1_000);
  assert.equal(r.calls.length, 1);
});

test("TanStack Query: ten updates of one job refetch the active jobs list once", async () => {
  const clock = new FakeClock();
  const timers = new FakeTimers(clock);
  const client = new QueryClient();
  const fetches: Record<string, number> = { jobs: 0, audit: 0, other: 0 };
  const observe = (key: QueryKey, name: string) =>
    new QueryObserver(client, {
      queryKey: key,
      queryFn: async () => ++fetches[name]!,
      staleTime: Infinity,
    }).subscribe(() => {});
  const offs = [observe(["jobs", ORG], "jobs"), observe(["jobs", ORG2], "other")];
  const audit = observe(["audit", ORG], "audit");
  await new Promise((r) => setTimeout(r, 10));
  audit(); // the audit page is closed: its query is inactive
  assert.deepEqual(fetches, { jobs: 1, audit: 1, other: 1 });
  const inv = tanstackInvalidator(client, seed, { timers, page: null });
  for (let i = 0; i < 10; i++) inv.event(ev("job.updated", { entity_id: "7" }));
  inv.event(ev("audit.appended"));
  timers.advance(50);
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(
    fetches,
    { jobs: 2, audit: 1, other: 1 },
    "one refetch; the closed audit page none",
  );
  assert.ok(client.getQueryState(["audit", ORG])!.isInvalidated, "but it is stale for next time");
  inv.resync(ORG2);
  timers.advance(50);
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(fetches.other, 2);
  offs.forEach((f) => f());
  client.clear();
});

test("SWR keys: arrays match by prefix, strings a one-part key", () => {
  assert.ok(swrKeyMatches(["jobs", ORG, { page: 2 }], ["jobs", ORG]));
  assert.ok(!swrKeyMatches(["jobs", ORG2], ["jobs", ORG]));
  assert.ok(swrKeyMatches("/api/jobs", ["/api/jobs"]));
  assert.ok(!swrKeyMatches("/api/jobs", ["jobs", ORG]));
});
