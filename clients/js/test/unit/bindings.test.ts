/**
 * React, TanStack Query and SWR bindings in a real Chromium (skipped only when
 * /usr/bin/chromium is missing): ten updates of one job refetch once, a resync
 * refetches, and useRelayStatus shows the state.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { chromium, type Browser, type Page } from "playwright-core";

const CHROMIUM = process.env.PGRELAY_JS_CHROMIUM ?? "/usr/bin/chromium";
const skip = existsSync(CHROMIUM) ? false : `${CHROMIUM} is missing`;
const bundle = join(import.meta.dirname, "../../browser/bindings-page.js");
let browser: Browser;

before(async () => {
  if (skip) return;
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: 30_000,
  });
});
after(() => browser?.close());

const text = (page: Page, id: string) => page.locator("#" + id).textContent({ timeout: 5_000 });
const fetches = (page: Page) =>
  page.evaluate(() => (window as unknown as { fetches: object }).fetches);
const server = (page: Page, call: string) => page.evaluate(`window.server.${call}`);

test("bindings: useRelayStatus, useRelay, TanStack and SWR invalidation", { skip }, async () => {
  const page = await browser.newPage();
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto("about:blank"); // no localStorage here: the client falls back to memory
  await page.addScriptTag({ content: readFileSync(bundle, "utf8") });
  await page.waitForSelector('#status[data-state="connected"][data-org="live"]', {
    timeout: 5_000,
  });
  await page.waitForFunction(() => document.querySelector("#swr")?.textContent == "1");
  assert.deepEqual(await fetches(page), { tanstack: 1, swr: 1 });
  const sent = (await page.evaluate("window.server.sent")) as string[];
  assert.equal(sent.filter((t) => t == "subscribe").length, 1, "three hooks, one subscription");

  await server(
    page,
    `sent.length && [...Array(10)].forEach(() => window.server.event("job.updated", "7"))`,
  );
  await page.waitForFunction(() => document.querySelector("#events")?.textContent == "10");
  await page.waitForTimeout(300);
  assert.deepEqual(await fetches(page), { tanstack: 2, swr: 2 }, "ten updates: one refetch each");
  assert.equal(await text(page, "tanstack"), "2");

  await server(page, `event("audit.appended", "1")`);
  await page.waitForTimeout(200);
  assert.deepEqual(await fetches(page), { tanstack: 2, swr: 2 }, "not routed, not refetched");
  assert.equal(await text(page, "events"), "10", "useRelay's eventTypes filter");

  await server(page, "resync()");
  await page.waitForTimeout(300);
  assert.deepEqual(await fetches(page), { tanstack: 3, swr: 3 }, "a resync refetches the org");

  await server(page, "drop(1006)");
  await page.waitForSelector('#status[data-state="reconnecting"]', { timeout: 2_000 });
  await page.waitForSelector('#status[data-state="connected"]', { timeout: 5_000 });
  assert.deepEqual(errors, []);
  await page.close();
});
