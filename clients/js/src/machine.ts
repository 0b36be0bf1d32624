/**
 * The connection state machine. Everything that affects the connection lives
 * here; it does no I/O. The shell (client.ts) feeds it inputs (a frame, a close
 * code, a timer that fired, the page becoming visible, the network coming
 * back, a token from the app, an app handler that finished) and carries out
 * the actions it returns, in order (open a socket, send, close, call getToken,
 * deliver to the app, persist a cursor, re-arm the one timer).
 *
 * Time comes from the injected clock: `now()` is monotonic (timeouts, backoff),
 * `wall()` is the wall clock (token expiry, lag, clock-jump detection). Every
 * timeout is checked against the clock when any timer fires, never trusted to
 * the timer's punctuality: throttled background timers only make a check late.
 *
 * Rules decided here (the README's "For web apps" section says them to users):
 * - A token is asked for before every connect, when the server refuses one
 *   (4001), and ahead of `expires_at` (then sent in-band as `auth`). One
 *   request at a time; triggers while one is in flight share it. A result for
 *   an older connection (or from before stop/sign-out) is dropped, and a new
 *   request made if a token is still needed. `null`, an error marked
 *   unauthorized, or the very token the server refused: state `unauthorized`.
 * - Events of one org reach the app one at a time, in order; the cursor is
 *   persisted only after the app's handler for that event finished. Repeated
 *   ids (a resume repeats the batch in flight) are dropped.
 * - Close codes: closecodes.ts, one table.
 */
import { RESTART_WINDOW_MS, closeRule } from "./closecodes.js";
import {
  parseServerFrame,
  type ClientFrame,
  type EventFrame,
  type OrgFrame,
  type ResyncReason,
} from "./protocol.js";

/** Injected time and randomness. */
export interface Clock {
  /** Monotonic milliseconds (performance.now). */
  now(): number;
  /** Wall-clock milliseconds since the epoch (Date.now). */
  wall(): number;
  /** Uniform in [0, 1) (Math.random). */
  random(): number;
}

/** Every timing rule, in milliseconds, with its default. */
export const TIMING = {
  /** Full-jitter backoff: the ceiling starts here and doubles per failed attempt... */
  backoffBaseMs: 500,
  /** ...up to this. */
  backoffMaxMs: 30_000,
  /** A connection up this long resets the backoff (and earns 1011/4008 an instant retry). */
  stableMs: 10_000,
  /** Send an app-level ping when nothing was received for this long. */
  idlePingMs: 25_000,
  /** A ping (or an in-band auth) with nothing received back for this long: the socket is dead. */
  probeTimeoutMs: 3_000,
  /** Opening the socket and getting `ready` may take this long. */
  connectTimeoutMs: 10_000,
  /** A page hidden this long closes its socket (battery); it resumes when visible. */
  hiddenGraceMs: 120_000,
  /** Sample the clocks this often while active: if the wall clock moved more than this
   * beyond the monotonic one since the last sample, the machine slept (a clock jump).
   * A failed token refresh is retried after this too. */
  tickMs: 5_000,
  /** Refresh the token this long before `expires_at` (at most half its remaining life). */
  refreshMarginMs: 60_000,
};
export type Timing = typeof TIMING;

/** The connection, as the app should show it. */
export type ConnectionState =
  | "idle" // not started, stopped or signed out
  | "connecting" // the first connection is being made
  | "connected"
  | "reconnecting" // see attempt, retryAt, lastError
  | "paused" // the page was hidden longer than the grace: socket closed until visible
  | "offline" // the browser says it is offline: waiting for `online`
  | "unauthorized" // no usable token: sign in again, then start()
  | "failed"; // a close code that means this client is broken; see lastError

/** One organization's subscription. */
export type OrgState = "pending" | "catching_up" | "live" | "resync" | "forbidden" | "error";

export interface OrgStatus {
  state: OrgState;
  /** Catch-up events received for the current subscribe (final once live). */
  replayed: number;
  /** wall clock minus `created_at` of the last event handled; null before any. */
  lagMs: number | null;
  /** Why it is `forbidden` or `error`. */
  error: string | null;
}

export interface Status {
  state: ConnectionState;
  /** Consecutive failed attempts (reconnecting). */
  attempt: number;
  /** Wall-clock ms of the next attempt, while one is scheduled. */
  retryAt: number | null;
  /** The last failure, for humans; never contains a token. */
  lastError: string | null;
  /** The last close code: received, or sent by this client (1000, or 4000 for a dead socket). */
  closeCode: number | null;
  orgs: Record<string, OrgStatus>;
}

/** What a subscription asks the server for. */
export interface SubOptions {
  /** Globs such as `job.*`; null or absent: every event type. */
  eventTypes?: string[] | null;
  /** Server-side coalescing window. */
  coalesceMs?: number | null;
}

export type TokenResult = { token: string | null } | { error: unknown; unauthorized: boolean };

export type Input =
  | { type: "start" }
  | { type: "stop" }
  | { type: "signOut" }
  | { type: "want"; org: string; options: SubOptions | null }
  | { type: "token"; req: number; result: TokenResult }
  | { type: "open"; conn: number }
  | { type: "frame"; conn: number; data: unknown }
  | { type: "closed"; conn: number; code: number }
  | { type: "tick" }
  | { type: "visible"; visible: boolean }
  | { type: "online"; online: boolean }
  | { type: "wake" }
  | { type: "handled"; org: string };

export type Action =
  | { type: "token"; req: number }
  | { type: "open"; conn: number }
  | { type: "send"; conn: number; frame: ClientFrame }
  | { type: "close"; conn: number; code: number; reason: string }
  | { type: "deliver"; org: string; event: EventFrame; replayed: boolean }
  | { type: "resync"; org: string; reason: ResyncReason }
  | { type: "persist"; key: string; value: string }
  | { type: "clear"; prefix: string }
  | { type: "status" };

export interface MachineConfig extends Partial<Timing> {
  clock: Clock;
  /** The WebSocket URL: part of the storage key. */
  endpoint: string;
  /** Reads a persisted record (the shell's storage). */
  load(key: string): string | null;
  /** The user part of the storage key; default: the token's `sub`. */
  user?: string;
}

type Phase =
  | "idle"
  | "token" // waiting for getToken before opening
  | "opening"
  | "auth" // auth sent, waiting for ready
  | "ready"
  | "backoff"
  | "paused"
  | "offline"
  | "unauthorized"
  | "failed";

type Item =
  | { k: "event"; e: EventFrame; replayed: boolean }
  | { k: "resync"; reason: ResyncReason; cursor: string }
  | { k: "mark"; cursor: string };

interface Sub {
  options: SubOptions;
  /** The ref of our subscribe on the current connection; null when not sent. */
  ref: string | null;
  /** `subscribed` received on the current connection. */
  live: boolean;
  replayed: number;
  resyncs: number;
  /** forbidden or error: not resubscribed until the app subscribes again. */
  blocked: string | null;
  /** The latest cursor received: where this page resumes while it lives. */
  cursor: string | null;
  loaded: boolean;
  seen: Set<number>;
  queue: Item[];
  busy: boolean;
  lagMs: number | null;
}

const STORAGE_PREFIX = "pgrelay|";
/** Event ids remembered per org to drop repeats (the server's default replay limit). */
const DEDUPE_WINDOW = 10_000;

/** `sub` of a JWT, read without verifying (only to key the cursors by user). */
export function tokenSubject(token: string): string {
  try {
    const part = token.split(".")[1]!.replace(/-/g, "+").replace(/_/g, "/");
    const sub = (JSON.parse(atob(part)) as { sub?: unknown }).sub;
    return typeof sub == "string" ? sub : "";
  } catch {
    return "";
  }
}

/** What the server gets for several wishes on one org: the union of types, the least coalescing. */
export function mergeOptions(list: (SubOptions | null)[]): SubOptions | null {
  const all = list.filter((o): o is SubOptions => !!o);
  return all.length
    ? {
        eventTypes: all.some((o) => !o.eventTypes)
          ? null
          : [...new Set(all.flatMap((o) => o.eventTypes!))],
        coalesceMs: all.some((o) => !o.coalesceMs)
          ? null
          : Math.min(...all.map((o) => o.coalesceMs!)),
      }
    : null;
}

export class Machine {
  /** The configuration, over the default timings. */
  readonly #t: Timing & MachineConfig;
  readonly #clock: Clock;
  #out: Action[] = [];
  #phase: Phase = "idle";
  #started = false;
  /** Bumped whenever a connection attempt starts or a socket goes away: tags tokens and sockets. */
  #gen = 0;
  /** Bumped by stop and sign-out: a token asked for before is never used. */
  #epoch = 0;
  #attempt = 0;
  #retryAt: number | null = null;
  #lastError: string | null = null;
  #closeCode: number | null = null;
  #token: string | null = null;
  #user: string | null = null;
  /** The token the server refused (4001): getToken must give another. */
  #refused: string | null = null;
  #refreshAt: number | null = null;
  #refreshWall = 0;
  #refreshing = false;
  #tokenReq: { id: number; gen: number; epoch: number } | null = null;
  #tokenIds = 0;
  #openedAt = 0;
  #readyAt: number | null = null;
  #lastRx = 0;
  #pingAt: number | null = null;
  #authAt: number | null = null;
  #hiddenAt: number | null = null;
  #online = true;
  #tickMono: number;
  #tickWall: number;
  #refs = 0;
  readonly #subs = new Map<string, Sub>();
  #statusKey = "";

  constructor(cfg: MachineConfig) {
    this.#t = { ...TIMING, ...cfg };
    this.#clock = cfg.clock;
    this.#tickMono = this.#clock.now();
    this.#tickWall = this.#clock.wall();
  }

  /** Feed one input; the actions to carry out, in order. */
  handle(input: Input): Action[] {
    this.#out = [];
    const now = this.#clock.now();
    const p = this.#phase;
    switch (input.type) {
      case "start":
        this.#started = true;
        if (p == "idle" || p == "failed" || p == "unauthorized") this.#connectNow();
        break;
      case "stop":
      case "signOut":
        this.#epoch++;
        this.#started = this.#refreshing = false;
        if (this.#hasSocket()) this.#dropSocket(1000, input.type);
        this.#phase = "idle";
        if (input.type == "signOut") {
          this.#subs.clear();
          this.#token = this.#user = this.#refused = null;
          this.#out.push({
            type: "clear",
            prefix: STORAGE_PREFIX + this.#t.endpoint + "|",
          });
        }
        break;
      case "want":
        this.#want(input.org, input.options);
        break;
      case "token":
        this.#onToken(input.req, input.result);
        break;
      case "open":
        if (input.conn == this.#gen && p == "opening") {
          this.#phase = "auth";
          this.#lastRx = now;
          this.#send({ type: "auth", token: this.#token! });
        }
        break;
      case "frame":
        if (input.conn == this.#gen && this.#hasSocket()) this.#onFrame(input.data);
        break;
      case "closed":
        if (input.conn == this.#gen && this.#hasSocket()) this.#onClosed(input.code);
        break;
      case "tick":
        this.#onTick();
        break;
      case "visible":
        if (input.visible == (this.#hiddenAt === null)) break;
        this.#hiddenAt = input.visible ? null : now;
        if (input.visible) this.#wake();
        break;
      case "online":
        this.#online = input.online;
        if (input.online) this.#wake();
        else if (p == "backoff") this.#phase = "offline";
        else if (p == "ready") this.#probe();
        break;
      case "wake":
        this.#wake();
        break;
      case "handled":
        this.#onHandled(input.org);
        break;
    }
    // Listeners hear of every change of state (lag and counts are read, not announced).
    const key = JSON.stringify(this.status(), (k, v: unknown) =>
      k == "lagMs" || k == "replayed" ? undefined : v,
    );
    if (key != this.#statusKey) {
      this.#statusKey = key;
      this.#out.push({ type: "status" });
    }
    return this.#out;
  }

  /** Monotonic time at which the shell should feed `tick`; null: no timer needed. */
  deadline(): number | null {
    const t = this.#t;
    const p = this.#phase;
    if (p != "backoff" && p != "token" && !this.#hasSocket()) return null;
    const d = [this.#tickMono + t.tickMs, p == "backoff" ? this.#retryAt : null];
    if (p == "opening" || p == "auth") d.push(this.#openedAt + t.connectTimeoutMs);
    if (p == "ready") {
      d.push(
        this.#pingAt === null ? this.#lastRx + t.idlePingMs : this.#pingAt + t.probeTimeoutMs,
        this.#authAt === null ? null : this.#authAt + t.probeTimeoutMs,
        this.#hiddenAt === null ? null : this.#hiddenAt + t.hiddenGraceMs,
        this.#refreshing ? null : this.#refreshAt,
      );
    }
    return Math.min(...d.filter((x): x is number => x !== null));
  }

  status(): Status {
    const orgs: Record<string, OrgStatus> = {};
    for (const [org, s] of this.#subs)
      orgs[org] = {
        state: s.blocked
          ? s.blocked == "forbidden"
            ? "forbidden"
            : "error"
          : s.resyncs
            ? "resync"
            : s.live
              ? "live"
              : s.ref
                ? "catching_up"
                : "pending",
        replayed: s.replayed,
        lagMs: s.lagMs,
        error: s.blocked,
      };
    const p = this.#phase;
    return {
      state:
        p == "ready"
          ? "connected"
          : p == "backoff"
            ? this.#online
              ? "reconnecting"
              : "offline"
            : p == "token" || p == "opening" || p == "auth"
              ? this.#closeCode !== null || this.#attempt
                ? "reconnecting"
                : "connecting"
              : p,
      attempt: this.#attempt,
      retryAt:
        p == "backoff" ? Math.round(this.#clock.wall() + this.#retryAt! - this.#clock.now()) : null,
      lastError: this.#lastError,
      closeCode: this.#closeCode,
      orgs,
    };
  }

  // -- connecting ---------------------------------------------------------------------

  #hasSocket(): boolean {
    const p = this.#phase;
    return p == "opening" || p == "auth" || p == "ready";
  }

  #connectNow(): void {
    if (!this.#started || this.#phase == "token" || this.#hasSocket()) return;
    if (!this.#online) {
      this.#phase = "offline";
      return;
    }
    this.#gen++;
    this.#phase = "token";
    this.#requestToken();
  }

  /** One getToken at a time; a stale one's result triggers the next request. */
  #requestToken(): void {
    if (this.#tokenReq) return;
    this.#tokenReq = {
      id: ++this.#tokenIds,
      gen: this.#gen,
      epoch: this.#epoch,
    };
    this.#out.push({ type: "token", req: this.#tokenIds });
  }

  #needsToken(): boolean {
    return this.#phase == "token" || (this.#phase == "ready" && this.#refreshing);
  }

  #onToken(req: number, result: TokenResult): void {
    const r = this.#tokenReq;
    if (!r || r.id != req) return;
    this.#tokenReq = null;
    if (r.gen != this.#gen || r.epoch != this.#epoch) {
      // Asked for an older connection (or before a stop): never used.
      if (this.#needsToken()) this.#requestToken();
      return;
    }
    if (!this.#needsToken()) return;
    const connecting = this.#phase == "token";
    this.#refreshing = false;
    if ("error" in result) {
      const msg = "getToken: " + String((result.error as Error)?.message ?? result.error);
      if (result.unauthorized) return this.#unauthorized(msg);
      this.#lastError = msg;
      if (connecting) return this.#retryLater();
      this.#refreshAt = this.#clock.now() + this.#t.tickMs;
      return;
    }
    const token = result.token;
    if (!token || token == this.#refused) return this.#unauthorized("no new token");
    const user = this.#t.user ?? tokenSubject(token);
    if (!connecting) {
      if (user == this.#user) {
        this.#token = token;
        this.#authAt = this.#clock.now();
        return this.#send({ type: "auth", token });
      }
      // The server refuses a refresh for another subject: reconnect as the new user.
      this.#dropSocket(1000, "user changed");
      this.#gen++;
    }
    this.#token = token;
    if (user != this.#user) {
      // Cursors and seen ids belong to a user: start over for another one.
      for (const s of this.#subs.values()) this.#resetSub(s);
      this.#user = user;
    }
    this.#phase = "opening";
    this.#openedAt = this.#clock.now();
    this.#readyAt = null;
    this.#out.push({ type: "open", conn: this.#gen });
  }

  #unauthorized(why: string): void {
    if (this.#hasSocket()) this.#dropSocket(1000, "unauthorized");
    this.#phase = "unauthorized";
    this.#lastError = why;
    this.#token = null;
  }

  /** Close our socket; its close event, when it comes, is ignored. */
  #dropSocket(code: number, reason: string): void {
    this.#out.push({ type: "close", conn: this.#gen, code, reason });
    this.#closeCode = code;
    this.#afterSocket();
  }

  #afterSocket(): void {
    this.#gen++;
    this.#pingAt = this.#authAt = this.#refreshAt = null;
    this.#refreshing = false;
    for (const s of this.#subs.values()) {
      s.ref = null;
      s.live = false;
    }
  }

  #retryLater(delay?: number): void {
    const t = this.#t;
    this.#attempt++;
    this.#retryAt =
      this.#clock.now() +
      (delay ??
        this.#clock.random() *
          Math.min(t.backoffMaxMs, t.backoffBaseMs * 2 ** (this.#attempt - 1)));
    this.#phase = this.#online ? "backoff" : "offline";
  }

  #onClosed(code: number): void {
    const t = this.#t;
    const up = this.#readyAt !== null;
    const stable = up && this.#clock.now() - this.#readyAt! >= t.stableMs;
    if (stable) this.#attempt = 0;
    this.#afterSocket();
    this.#phase = "idle";
    const [then, why] = closeRule(code);
    this.#closeCode = code;
    this.#lastError = `${why} (${code})`;
    if (then == "stop") this.#phase = "failed";
    else if (then == "token") {
      this.#refused = this.#token;
      up ? this.#connectNow() : this.#retryLater();
    } else if (then == "now" && stable) this.#connectNow();
    else
      this.#retryLater(
        then == "restart"
          ? RESTART_WINDOW_MS[0] +
              this.#clock.random() * (RESTART_WINDOW_MS[1] - RESTART_WINDOW_MS[0])
          : undefined,
      );
  }

  // -- connected ----------------------------------------------------------------------

  #send(frame: ClientFrame): void {
    this.#out.push({ type: "send", conn: this.#gen, frame });
  }

  #onFrame(data: unknown): void {
    const now = this.#clock.now();
    this.#lastRx = now;
    this.#pingAt = null; // anything received after the ping proves the socket alive
    const f = parseServerFrame(data);
    if (f?.type == "ready") {
      this.#authAt = null;
      const left = f.expires_at * 1000 - this.#clock.wall();
      const margin = Math.min(this.#t.refreshMarginMs, left / 2);
      this.#refreshWall = f.expires_at * 1000 - margin;
      this.#refreshAt = now + Math.max(0, left - margin);
      if (this.#phase == "auth") {
        this.#phase = "ready";
        this.#readyAt = now;
        this.#refused = this.#lastError = null;
        for (const [org, s] of this.#subs) this.#wire(org, s);
      }
    } else if (f?.type == "error") {
      for (const s of this.#subs.values())
        if (f.ref !== null && s.ref == f.ref) {
          // rate_limited, internal: subscribed again on the next tick; anything else is for the app
          s.ref = null;
          if (f.code != "rate_limited" && f.code != "internal") s.blocked = f.code;
          return;
        }
      this.#lastError = f.code + ": " + f.message;
    } else if (
      f &&
      f.type != "pong" &&
      (f.type != "subscribed" || this.#subs.get(f.org)?.ref == f.ref)
    ) {
      this.#ingest(f);
    }
  }

  #onTick(): void {
    const t = this.#t;
    const now = this.#clock.now();
    const wall = this.#clock.wall();
    const jumped = Math.abs(wall - this.#tickWall - (now - this.#tickMono)) > t.tickMs;
    this.#tickMono = now;
    this.#tickWall = wall;
    if (jumped) this.#wake(); // a sleep: the socket may be dead without a close event
    const p = this.#phase;
    if (p == "backoff" && now >= this.#retryAt!) return this.#connectNow();
    if ((p == "opening" || p == "auth") && now - this.#openedAt >= t.connectTimeoutMs) {
      this.#dropSocket(4000, "connect timeout");
      this.#lastError = "connect timeout";
      return this.#retryLater();
    }
    if (p != "ready") return;
    if (
      (this.#pingAt !== null && now - this.#pingAt >= t.probeTimeoutMs) ||
      (this.#authAt !== null && now - this.#authAt >= t.probeTimeoutMs)
    ) {
      this.#dropSocket(4000, "no pong");
      this.#lastError = "no pong";
      this.#phase = "idle";
      return this.#connectNow();
    }
    if (this.#hiddenAt !== null && now - this.#hiddenAt >= t.hiddenGraceMs) {
      this.#dropSocket(1000, "page hidden");
      this.#phase = "paused";
      return;
    }
    if (this.#refreshDue()) this.#refresh();
    else if (now - this.#lastRx >= t.idlePingMs) this.#probe();
    for (const [org, s] of this.#subs) if (!s.ref) this.#wire(org, s);
  }

  #refreshDue(): boolean {
    return (
      !this.#refreshing &&
      this.#refreshAt !== null &&
      (this.#clock.now() >= this.#refreshAt || this.#clock.wall() >= this.#refreshWall)
    );
  }

  #refresh(): void {
    this.#refreshing = true;
    this.#requestToken();
  }

  #probe(): void {
    if (this.#pingAt !== null || this.#authAt !== null || this.#refreshing) return;
    this.#pingAt = this.#clock.now();
    this.#send({ type: "ping", ref: "p" + ++this.#refs });
  }

  /** Back from hidden, offline, bfcache, frozen, or a sleep: connect now, or check the socket. */
  #wake(): void {
    const p = this.#phase;
    if (p == "backoff" || p == "paused" || p == "offline") {
      this.#phase = "idle";
      this.#connectNow();
    }
    // An expired token first: the in-band auth is then the probe (ready answers it).
    else if (p == "ready") this.#refreshDue() ? this.#refresh() : this.#probe();
  }

  // -- subscriptions and delivery -----------------------------------------------------

  #resetSub(s: Sub): void {
    s.cursor = null;
    s.seen.clear();
    s.loaded = false;
  }

  #want(org: string, options: SubOptions | null): void {
    let s = this.#subs.get(org);
    if (!options) {
      if (s?.ref && this.#phase == "ready")
        this.#send({ type: "unsubscribe", ref: "u" + ++this.#refs, org });
      this.#subs.delete(org);
      return;
    }
    const same = JSON.stringify(options) == JSON.stringify(s?.options);
    if (!s)
      this.#subs.set(
        org,
        (s = {
          options,
          ref: null,
          live: false,
          replayed: 0,
          resyncs: 0,
          blocked: null,
          cursor: null,
          loaded: false,
          seen: new Set(),
          queue: [],
          busy: false,
          lagMs: null,
        }),
      );
    s.options = options;
    s.blocked = null;
    if (!s.ref || !same) this.#wire(org, s);
  }

  /** Send (or resend) the subscribe for an org, with its cursor. */
  #wire(org: string, s: Sub): void {
    if (this.#phase != "ready" || s.blocked) return;
    if (!s.loaded) {
      s.loaded = true;
      s.cursor ??= this.#t.load(this.#key(org));
    }
    const o = s.options;
    s.ref = "s" + ++this.#refs;
    s.live = false;
    s.replayed = 0;
    this.#send({
      type: "subscribe",
      ref: s.ref,
      org,
      cursor: s.cursor,
      ...(o.eventTypes && { event_types: o.eventTypes }),
      ...(o.coalesceMs && { coalesce_ms: o.coalesceMs }),
    });
  }

  #remember(s: Sub, id: number): void {
    s.seen.add(id);
    if (s.seen.size > DEDUPE_WINDOW) s.seen.delete(s.seen.values().next().value!);
  }

  #ingest(f: OrgFrame): void {
    const s = this.#subs.get(f.org);
    if (!s) return;
    if (f.type == "event") {
      if (s.seen.has(f.id)) return; // a repeat of the batch in flight
      this.#remember(s, f.id);
      s.cursor = f.cursor;
      if (!s.live) s.replayed++;
      s.queue.push({ k: "event", e: f, replayed: !s.live });
    } else if (f.type == "subscribed") {
      s.cursor = f.cursor;
      s.live = true;
      s.replayed = f.replayed;
      s.queue.push({ k: "mark", cursor: f.cursor });
    } else if (f.type == "resync") {
      s.cursor = f.cursor;
      s.resyncs++;
      s.queue.push({ k: "resync", reason: f.reason, cursor: f.cursor });
    } else if (f.reason == "forbidden") {
      s.ref = null;
      s.blocked = "forbidden";
    }
    this.#pump(f.org, s);
  }

  /** Hand the next item to the app, unless its handler is still busy. */
  #pump(org: string, s: Sub): void {
    while (!s.busy && s.queue.length) {
      const it = s.queue[0]!;
      if (it.k == "mark") {
        s.queue.shift();
        this.#save(org, s, it.cursor);
      } else {
        s.busy = true;
        this.#out.push(
          it.k == "event"
            ? { type: "deliver", org, event: it.e, replayed: it.replayed }
            : { type: "resync", org, reason: it.reason },
        );
      }
    }
  }

  #onHandled(org: string): void {
    const s = this.#subs.get(org);
    if (!s?.busy) return;
    s.busy = false;
    const it = s.queue.shift()!;
    if (it.k == "event") {
      s.lagMs = Math.max(0, this.#clock.wall() - Date.parse(it.e.created_at));
      this.#save(org, s, it.e.cursor);
    } else if (it.k == "resync") {
      s.resyncs--;
      this.#save(org, s, it.cursor);
    }
    this.#pump(org, s);
  }

  #key(org: string): string {
    return STORAGE_PREFIX + this.#t.endpoint + "|" + this.#user + "|" + org;
  }

  /** Persist where to resume, now that everything before it was handled. */
  #save(org: string, s: Sub, cursor: string): void {
    if (this.#user !== null)
      this.#out.push({ type: "persist", key: this.#key(org), value: cursor });
  }
}
