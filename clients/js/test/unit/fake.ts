/**
 * A fake server for the unit tests (centrifuge-js's fakeServer.ts is the
 * pattern): an injected monotonic clock and wall clock that only move when a
 * test says so, timers driven by that clock, a seeded random source, memory
 * storage, and WebSocket objects the test plays the server side of.
 */
import assert from "node:assert/strict";
import {
  createRelay,
  type RelayClient,
  type RelayOptions,
  type PageEvents,
  type PageInput,
  type WebSocketLike,
} from "../../src/index.js";
import { memoryStorage, type CursorStorage } from "../../src/storage.js";

/** A small seeded PRNG (mulberry32): the same seed, the same sequence. */
export function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString("base64url");
/** An unsigned JWT-shaped token: the client only reads `sub`. */
export function jwt(sub: string, n: number | string): string {
  return `${b64({ alg: "HS256" })}.${b64({ sub, n })}.sig${n}`;
}

export class FakeClock {
  mono = 1_000;
  wallMs = Date.UTC(2025, 0, 1);
  random: () => number;
  constructor(seed = 1) {
    this.random = seeded(seed);
  }
  now = () => this.mono;
  wall = () => this.wallMs;
  /** Both clocks move (the machine is awake). */
  pass(ms: number) {
    this.mono += ms;
    this.wallMs += ms;
  }
}

interface Timer {
  id: number;
  at: number;
  fn: () => void;
}

export class FakeTimers {
  private list: Timer[] = [];
  private ids = 0;
  constructor(private clock: FakeClock) {}
  set = (fn: () => void, ms: number) => {
    const t = { id: ++this.ids, at: this.clock.mono + ms, fn };
    this.list.push(t);
    return t.id;
  };
  clear = (id: unknown) => {
    this.list = this.list.filter((t) => t.id !== id);
  };
  get next(): number | null {
    return this.list.length ? Math.min(...this.list.map((t) => t.at)) : null;
  }
  /** Fire every timer due within `ms`, in order, moving both clocks; then move to the end. */
  advance(ms: number) {
    const end = this.clock.mono + ms;
    for (let guard = 0; guard < 100_000; guard++) {
      const due = this.list.filter((t) => t.at <= end).sort((a, b) => a.at - b.at)[0];
      if (!due) break;
      this.list = this.list.filter((t) => t !== due);
      this.clock.pass(Math.max(0, due.at - this.clock.mono));
      due.fn();
    }
    this.clock.pass(end - this.clock.mono);
  }
  /** A throttled background tab: the clocks move but no timer fires. */
  starve(ms: number) {
    this.clock.pass(ms);
  }
}

export class FakeSocket implements WebSocketLike {
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  sent: Record<string, unknown>[] = [];
  closedByClient: { code?: number; reason?: string } | null = null;
  /** Answer pings, as a live server does; false plays a dead network. */
  autoPong = true;
  constructor(public url: string) {}
  send(data: string) {
    const f = JSON.parse(data) as Record<string, unknown>;
    this.sent.push(f);
    if (f.type == "ping" && this.autoPong && !this.closedByClient)
      this.frame({ type: "pong", ref: f.ref });
  }
  close(code?: number, reason?: string) {
    this.closedByClient = { code, reason };
  }
  // -- the server's side --
  accept() {
    this.onopen?.({});
  }
  frame(f: Record<string, unknown>) {
    this.onmessage?.({ data: JSON.stringify(f) });
  }
  drop(code: number) {
    this.onclose?.({ code });
  }
  ofType(type: string) {
    return this.sent.filter((f) => f.type === type);
  }
}

/** Page events the test fires by hand. */
export class FakePage implements PageEvents {
  isVisible = true;
  isOnline = true;
  private emit: ((input: PageInput) => void) | null = null;
  listen(emit: (input: PageInput) => void) {
    this.emit = emit;
    if (!this.isVisible) emit({ type: "visible", visible: false });
    if (!this.isOnline) emit({ type: "online", online: false });
    return () => {
      this.emit = null;
    };
  }
  fire(ev: "visible" | "hidden" | "online" | "offline" | "wake") {
    if (ev == "visible" || ev == "hidden") this.isVisible = ev == "visible";
    if (ev == "online" || ev == "offline") this.isOnline = ev == "online";
    this.emit?.(
      ev == "wake"
        ? { type: "wake" }
        : ev == "visible" || ev == "hidden"
          ? { type: "visible", visible: this.isVisible }
          : { type: "online", online: this.isOnline },
    );
  }
}

/** Let promises (getToken, handlers) settle. */
export const settle = () => new Promise<void>((r) => setImmediate(r));

export const ORG = "6f1c6f1c-0000-4000-8000-000000000001";
export const ORG2 = "6f1c6f1c-0000-4000-8000-000000000002";
export const URL_ = "ws://relay.test/v1";

export interface Rig {
  relay: RelayClient;
  clock: FakeClock;
  timers: FakeTimers;
  page: FakePage;
  sockets: FakeSocket[];
  storage: CursorStorage;
  tokenCalls: number;
  /** What getToken gives next (a function of the call number). */
  tokens: (n: number) => string | null | Promise<string | null>;
  sock(): FakeSocket;
}

export function rig(options: Partial<RelayOptions> & { seed?: number } = {}): Rig {
  const clock = new FakeClock(options.seed ?? 1);
  const timers = new FakeTimers(clock);
  const page = new FakePage();
  const sockets: FakeSocket[] = [];
  const r = {
    clock,
    timers,
    page,
    sockets,
    storage: options.storage ?? memoryStorage(),
    tokenCalls: 0,
    tokens: (n: number): string | null | Promise<string | null> => jwt("user-1", n),
    sock() {
      const s = sockets.at(-1);
      assert.ok(s, "no socket was opened");
      return s;
    },
  } as Rig;
  class WS extends FakeSocket {
    constructor(url: string) {
      super(url);
      sockets.push(this);
    }
  }
  r.relay = createRelay({
    url: URL_,
    getToken: () => r.tokens(++r.tokenCalls),
    storage: r.storage,
    WebSocket: WS,
    clock,
    timers,
    page,
    ...options,
  });
  return r;
}

/** Answer the socket's auth with ready (token valid for `lifeS` seconds). */
export async function accept(r: Rig, lifeS = 3600): Promise<FakeSocket> {
  await settle();
  const s = r.sock();
  s.accept();
  assert.equal(s.sent[0]?.type, "auth", "the first frame is auth");
  s.frame({
    type: "ready",
    connection_id: "c" + r.sockets.length,
    expires_at: Math.floor(r.clock.wallMs / 1000) + lifeS,
  });
  await settle();
  return s;
}

let nextId = 1;
export function event(org: string, cursor: string, extra: Record<string, unknown> = {}) {
  return {
    type: "event",
    org,
    id: nextId++,
    event_type: "job.updated",
    entity_type: "job",
    entity_id: "42",
    actor_id: null,
    payload: {},
    created_at: new Date(Date.UTC(2025, 0, 1)).toISOString(),
    cursor,
    ...extra,
  };
}
