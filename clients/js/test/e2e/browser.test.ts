/**
 * The SDK in a real headless Chromium (Debian's /usr/bin/chromium, driven by
 * playwright-core over the DevTools protocol) against the real pgrelay serve
 * and PostgreSQL; the events table is the oracle. The page is the SDK bundle
 * `pgrelay dev` serves (test/e2e/page.html).
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";
import {
  CHROMIUM,
  HARNESS,
  WS_URL,
  connections,
  emit,
  newOrg,
  skip,
  sleep,
  sorted,
  tableIds,
  until,
} from "./support.js";

declare global {
  interface Window {
    seen: number[];
    sent: string[];
    states: string[];
    relay: {
      status(): { state: string; role?: string; orgs: Record<string, { state: string }> };
      role?: string;
    };
  }
}

const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-dev-shm-usage",
];
let browser: Browser;

// playwright gives the browser a fresh profile (--user-data-dir) of its own and removes it.
before(async () => {
  if (!skip)
    browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS, timeout: 30_000 });
});
after(async () => {
  await browser?.close();
});

/**
 * Run `f` in a fresh browser context (its own localStorage, locks, channels),
 * closed afterwards whatever happens; `seen` gathers every id any of its pages' app saw.
 */
async function inContext(f: (ctx: BrowserContext, seen: number[]) => Promise<void>) {
  const ctx = await browser.newContext();
  ctx.setDefaultTimeout(15_000);
  const seen: number[] = [];
  await ctx.exposeFunction("recordSeen", (id: number) => void seen.push(id));
  try {
    await f(ctx, seen);
  } finally {
    await ctx.close();
  }
}

async function open(ctx: BrowserContext, org: string, params: Record<string, string> = {}) {
  const page = await ctx.newPage();
  const q = new URLSearchParams({ org, ws: WS_URL, ...params });
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${HARNESS}/page?${q}`);
  return Object.assign(page, { errors });
}

const orgState = (page: Page, org: string) =>
  page.evaluate((o) => window.relay.status().orgs[o]?.state ?? "none", org);
const live = (page: Page, org: string) =>
  until(async () => (await orgState(page, org)) == "live", 15_000, "the page's org is live");
const seenIn = (page: Page) => page.evaluate(() => window.seen);

async function allSeen(page: Page, org: string, what: string) {
  const want = await tableIds(org);
  await until(async () => sorted(await seenIn(page)).length >= want.length, 20_000, what);
  const seen = await seenIn(page);
  assert.deepEqual(sorted(seen), want, `${what}: the app saw exactly the table's ids`);
  assert.equal(seen.length, new Set(seen).size, `${what}: no id twice`);
}

test("events arrive within a second, with the status and lag", { skip }, async () => {
  const org = newOrg();
  await inContext(async (ctx) => {
    const page = await open(ctx, org);
    await live(page, org);
    const t0 = Date.now();
    const ids = await emit(org, 5);
    await until(async () => (await seenIn(page)).length == 5, 5_000, "5 events");
    assert.ok(Date.now() - t0 < 1_000, `took ${Date.now() - t0} ms`);
    assert.deepEqual(await seenIn(page), ids);
    const status = await page.evaluate(() => window.relay.status());
    assert.equal(status.state, "connected");
    assert.deepEqual(page.errors, []);
  });
});

test("offline and back: the client notices, resumes, and loses nothing", { skip }, async () => {
  const org = newOrg();
  await inContext(async (ctx) => {
    const page = await open(ctx, org);
    await live(page, org);
    await emit(org, 20);
    await allSeen(page, org, "before going offline");
    await ctx.setOffline(true); // like flight mode: no close event, traffic stops
    await until(
      async () => (await page.evaluate(() => window.relay.status().state)) == "offline",
      10_000,
      "the client sees it is offline (a ping without a pong)",
    );
    for (let i = 0; i < 10; i++) await emit(org, 30); // 300 events in 10 transactions
    await sleep(300);
    assert.equal((await seenIn(page)).length, 20, "nothing can arrive while offline");
    await ctx.setOffline(false);
    await allSeen(page, org, "320 events after coming back");
    assert.equal(await page.evaluate(() => window.relay.status().state), "connected");
    assert.deepEqual(page.errors, []);
  });
});

test(
  "a frozen tab resumes: it probes its socket and gets what was sent meanwhile",
  { skip },
  async () => {
    const org = newOrg();
    await inContext(async (ctx) => {
      const page = await open(ctx, org);
      await live(page, org);
      await emit(org, 3);
      await allSeen(page, org, "before freezing");
      const pingsBefore = (await page.evaluate(() => window.sent)).filter(
        (t) => t == "ping",
      ).length;
      // Headless Chromium keeps every page visible, and Page.setWebLifecycleState does not
      // freeze a visible page; so the page is frozen as a frozen page behaves: none of its
      // JavaScript runs (the Debugger domain pauses it) while messages and timers queue up;
      // then it runs again and gets the `resume` event the browser fires on a thawed page.
      const cdp = await ctx.newCDPSession(page);
      await cdp.send("Debugger.enable");
      await cdp.send("Debugger.pause");
      await emit(org, 40);
      await sleep(4_000); // longer than the probe timeout: timers must not misjudge the wait
      await cdp.send("Debugger.resume");
      await cdp.send("Runtime.evaluate", {
        expression: "document.dispatchEvent(new Event('resume'))",
      });
      await allSeen(page, org, "43 events after resuming");
      const pings = (await page.evaluate(() => window.sent)).filter((t) => t == "ping").length;
      assert.ok(pings > pingsBefore, "resume probes the socket with a ping");
    });
  },
);

test(
  "the page is closed between the handler and the cursor save: reopened, nothing is lost",
  { skip },
  async () => {
    const org = newOrg();
    await inContext(async (ctx, seen) => {
      const first = await open(ctx, org, { hang: "hang" });
      await live(first, org);
      await emit(org, 50);
      const [hang] = await emit(org, 1, { entity_id: "hang" });
      await emit(org, 50);
      await until(() => seen.includes(hang!), 10_000, "the app got the event whose handler hangs");
      await sleep(200); // later events reach the page; their handlers wait behind the hanging one
      await first.close(); // while that handler runs: its cursor is never saved
      const firstSaw = [...seen];
      await emit(org, 50); // while no page is open
      const second = await open(ctx, org);
      const all = await tableIds(org);
      await until(
        () => all.every((id) => seen.includes(id)),
        20_000,
        "the reopened page catches up",
      );
      assert.deepEqual(sorted(seen), all, "every id the app saw, united, equals the table");
      assert.ok((await seenIn(second)).includes(hang!), "the unfinished event is delivered again");
      assert.ok(firstSaw.length >= 51 && firstSaw.length < all.length);
    });
  },
);

test(
  "three tabs hold one daemon connection; closing the leader loses nothing",
  { skip },
  async () => {
    const org = newOrg();
    await until(
      async () => (await connections()) == 0,
      10_000,
      "no connections left from other tests",
    );
    await inContext(async (ctx) => {
      const tabs = [];
      for (let i = 0; i < 3; i++) tabs.push(await open(ctx, org, { shared: "1" }));
      for (const t of tabs) await live(t, org);
      await until(async () => (await connections()) == 1, 5_000, "one connection");
      await sleep(300);
      assert.equal(await connections(), 1, "still one: three tabs share it");
      await emit(org, 30);
      for (const t of tabs) await allSeen(t, org, "30 events in every tab");
      const roles = await Promise.all(tabs.map((t) => t.evaluate(() => window.relay.role)));
      assert.deepEqual(roles.filter((r) => r == "leader").length, 1, String(roles));
      const leader = tabs[roles.indexOf("leader")]!;
      const rest = tabs.filter((t) => t !== leader);
      // Events keep coming while the leader's tab closes.
      const writer = (async () => {
        for (let i = 0; i < 20; i++) {
          await emit(org, 5);
          await sleep(40);
        }
      })();
      await sleep(200);
      const closedAt = Date.now();
      await leader.close();
      await until(
        async () =>
          (await Promise.all(rest.map((t) => t.evaluate(() => window.relay.role)))).includes(
            "leader",
          ),
        2_000,
        "another tab leads within 2 s",
      );
      const takeoverMs = Date.now() - closedAt;
      await writer;
      for (const t of rest)
        await allSeen(t, org, "every event in the remaining tabs, across the handover");
      await until(async () => (await connections()) == 1, 5_000, "one connection again");
      for (const t of rest) assert.deepEqual(t.errors, []);
      assert.ok(takeoverMs < 2_000, `takeover took ${takeoverMs} ms`);
    });
  },
);
