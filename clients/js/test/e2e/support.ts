/**
 * What the real-relay tests share. tests/e2e/test_js_client.py starts the
 * relay and a harness server and passes their URLs in the environment; run
 * elsewhere, these tests skip (and that pytest file fails on any skip).
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";

export const HARNESS = process.env.PGRELAY_JS_HARNESS_URL ?? "";
export const WS_URL = process.env.PGRELAY_JS_WS_URL ?? "";
export const ADMIN = process.env.PGRELAY_JS_ADMIN_URL ?? "";
export const CHROMIUM = process.env.PGRELAY_JS_CHROMIUM ?? "/usr/bin/chromium";
export const skip = HARNESS ? false : "run by tests/e2e/test_js_client.py against pgrelay serve";

export const newOrg = () => randomUUID();

export async function token(org: string, sub = "user-1"): Promise<string> {
  const r = await fetch(`${HARNESS}/token?org=${org}&sub=${sub}`);
  assert.equal(r.status, 200);
  return r.text();
}

/** `n` events in one transaction, as the backend; their ids. */
export async function emit(
  org: string,
  n: number,
  extra: { event_type?: string; entity_id?: string } = {},
): Promise<number[]> {
  const r = await fetch(`${HARNESS}/emit`, {
    method: "POST",
    body: JSON.stringify({ org, n, ...extra }),
  });
  assert.equal(r.status, 200);
  return (await r.json()) as number[];
}

/** The oracle: every id of the org in relay.events. */
export async function tableIds(org: string): Promise<number[]> {
  return (await (await fetch(`${HARNESS}/ids?org=${org}`)).json()) as number[];
}

/** pgrelay_connections from the daemon's /metrics. */
export async function connections(): Promise<number> {
  const text = await (await fetch(`${ADMIN}/metrics`)).text();
  const m = /^pgrelay_connections (\S+)$/m.exec(text);
  assert.ok(m, "no pgrelay_connections in /metrics");
  return Number(m[1]);
}

/** Poll `f` until it returns a truthy value, or fail after `timeoutMs` saying `what`. */
export async function until<T>(
  f: () => Promise<T> | T,
  timeoutMs: number,
  what: string,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await f();
      if (v) return v;
      last = v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline)
      assert.fail(`not within ${timeoutMs} ms: ${what} (last: ${String(last)})`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function sorted(ids: Iterable<number>): number[] {
  return [...new Set(ids)].sort((a, b) => a - b);
}
