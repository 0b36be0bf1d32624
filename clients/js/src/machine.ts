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
import { closeRule } from "./closecodes.js";
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
  /** After 1012 (server restarting): reconnect after a uniformly random delay in this range. */
  restartMinMs: 500,
  restartMaxMs: 5_000,
  /** Send an app-level ping when nothing was received for this long. */
  idlePingMs: 25_000,
  /** A ping (or an in-band auth) with nothing received back for this long: the socket is dead. */
  probeTimeoutMs: 3_000,
  /** Opening the socket and getting `ready` may take this long. */
  connectTimeoutMs: 10_000,
  /** A page hidden this long closes its socket (battery); it resumes when visible. */
  hiddenGraceMs: 120_000,
  /** Sample the clocks this often while active, to notice a sleep (clock jump). */
  tickMs: 5_000,
  /** Wall and monotonic clocks disagreeing by more than this since the last sample: a jump. */
  clockJumpMs: 5_000,
  /** Refresh the token this long before `expires_at` (at most half its remaining life). */
  refreshMarginMs: 60_000,
  /** A token refresh that failed (not unauthorized) is retried after this. */
  tokenRetryMs: 5_000,
  /** An org's subscribe answered `rate_limited` or `internal` is retried after this. */
  resubscribeMs: 5_000,
  /** Event ids remembered per org to drop repeats. */
  dedupeWindow: 10_000,
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
  /** The last close code received. */
  closeCode: number | null;
  /** solo: own socket; leader: the socket shared by this browser's tabs; follower: uses the leader's. */
  role: Role;
  orgs: Record<string, OrgStatus>;
}

export type Role = "solo" | "leader" | "follower";

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
  | { type: "reconnect" }
  | { type: "want"; org: string; who: "local" | "remote"; options: SubOptions | null }
  | { type: "token"; req: number; result: TokenResult }
  | { type: "open"; conn: number }
  | { type: "frame"; conn: number; data: unknown }
  | { type: "closed"; conn: number; code: number }
  | { type: "tick" }
  | { type: "visible"; visible: boolean }
  | { type: "online"; online: boolean }
  | { type: "wake" }
  | { type: "handled"; org: string }
  | { type: "role"; role: Role }
  | { type: "remote"; data: string }
  | { type: "remoteStatus"; status: Status; user: string | null };

export type Action =
  | { type: "token"; req: number }
  | { type: "open"; conn: number }
  | { type: "send"; conn: number; frame: ClientFrame }
  | { type: "close"; conn: number; code: number; reason: string }
  | { type: "deliver"; org: string; event: EventFrame; replayed: boolean }
  | { type: "resync"; org: string; reason: ResyncReason }
  | { type: "persist"; key: string; value: string }
  | { type: "clear"; prefix: string }
  | { type: "status" }
  | { type: "share"; data: string };

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
  local: SubOptions | null;
  remote: SubOptions | null;
  /** The ref of our subscribe on the current connection; null when not sent. */
  ref: string | null;
  /** `subscribed` received on the current connection. */
  live: boolean;
  replayed: number;
  resyncs: number;
  blocked: string | null; // forbidden / error: not resubscribed until wanted again
  blockedState: OrgState;
  retryAt: number | null;
  /** The latest cursor received: where this page resumes while it lives. */
  cursor: string | null;
  loaded: boolean;
  seen: Set<number>;
  queue: Item[];
  busy: boolean;
  lagMs: number | null;
  savedCursor: string | null;
  savedIds: number[];
}

/** Ids saved with a cursor (handled since that cursor first came): a reload drops their repeats. */
const SAVED_IDS = 100;
const STORAGE_PREFIX = "pgrelay|";

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

function merge(a: SubOptions | null, b: SubOptions | null): SubOptions {
  const all = [a, b].filter((o): o is SubOptions => !!o);
  const types = all.some((o) => !o.eventTypes)
    ? null
    : [...new Set(all.flatMap((o) => o.eventTypes!))].sort();
  const windows = all.map((o) => o.coalesceMs ?? 0);
  const coalesceMs = windows.length && Math.min(...windows) > 0 ? Math.min(...windows) : null;
  return { eventTypes: types, coalesceMs };
}

export class Machine {
  #t: Timing;
  #clock: Clock;
  #out: Action[] = [];
  #phase: Phase = "idle";
  #started = false;
  #role: Role = "solo";
  /** Bumped whenever a connection attempt starts or a socket goes away: tags tokens and sockets. */
  #gen = 0;
  /** Bumped by stop and sign-out: a token asked for before is never used. */
  #epoch = 0;
  #attempt = 0;
  #everConnected = false;
  #retryAt: number | null = null;
  #lastError: string | null = null;
  #closeCode: number | null = null;
  #token: string | null = null;
  #user: string | null = null;
  /** The token the server refused (4001): getToken must give another. */
  #refused: string | null = null;
  #expiresAt: number | null = null;
  #refreshAt: number | null = null;
  #refreshWall: number | null = null;
  #refreshing = false;
  #tokenReq: { id: number; gen: number; epoch: number } | null = null;
  #tokenIds = 0;
  #openedAt = 0;
  #readyAt: number | null = null;
  #lastRx = 0;
  #pingAt: number | null = null;
  #authAt: number | null = null;
  #visible = true;
  #hiddenAt: number | null = null;
  #online = true;
  #tickMono: number;
  #tickWall: number;
  #refs = 0;
  #subs = new Map<string, Sub>();
  #remote: Status | null = null;
  #statusKey = "";
  #lagDirty = false;
  #lagAt = -Infinity;

  #cfg: MachineConfig;

  constructor(cfg: MachineConfig) {
    this.#cfg = cfg;
    this.#t = { ...TIMING };
    for (const k in TIMING) {
      const v = cfg[k as keyof Timing];
      if (v !== undefined) this.#t[k as keyof Timing] = v;
    }
    this.#clock = cfg.clock;
    this.#tickMono = this.#clock.now();
    this.#tickWall = this.#clock.wall();
  }

  /** Feed one input; the actions to carry out, in order. */
  handle(input: Input): Action[] {
    this.#out = [];
    const now = this.#clock.now();
    switch (input.type) {
      case "start":
        this.#started = true;
        if (this.#phase == "idle" || this.#phase == "failed" || this.#phase == "unauthorized")
          this.#connectNow();
        break;
      case "reconnect":
        this.#started = true;
        this.#refused = null;
        this.#attempt = 0;
        if (this.#hasSocket()) this.#dropSocket(1000, "reconnect");
        this.#phase = "idle";
        this.#connectNow();
        break;
      case "stop":
        this.#halt("stopped");
        break;
      case "signOut":
        this.#halt("signed out");
        this.#subs.clear();
        this.#token = this.#user = this.#refused = null;
        this.#out.push({ type: "clear", prefix: STORAGE_PREFIX + this.#cfg.endpoint + "|" });
        break;
      case "want":
        this.#want(input.org, input.who, input.options);
        break;
      case "token":
        this.#onToken(input.req, input.result);
        break;
      case "open":
        if (input.conn == this.#gen && this.#phase == "opening") {
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
        if (input.visible == this.#visible) break;
        this.#visible = input.visible;
        this.#hiddenAt = input.visible ? null : now;
        if (input.visible) this.#wake();
        break;
      case "online":
        this.#online = input.online;
        if (input.online) this.#wake();
        else if (this.#phase == "backoff") this.#phase = "offline";
        else if (this.#phase == "ready") this.#probe();
        break;
      case "wake":
        this.#wake();
        break;
      case "handled":
        this.#onHandled(input.org);
        break;
      case "role":
        this.#setRole(input.role);
        break;
      case "remote":
        if (this.#role == "follower") this.#onRemote(input.data);
        break;
      case "remoteStatus":
        this.#remote = input.status;
        if (input.user !== null && input.user != this.#user) {
          for (const s of this.#subs.values()) this.#resetSub(s);
          this.#user = input.user;
        }
        break;
    }
    const key = this.#key();
    if (key != this.#statusKey || (this.#lagDirty && now - this.#lagAt >= 1000)) {
      this.#statusKey = key;
      this.#lagDirty = false;
      this.#lagAt = now;
      this.#out.push({ type: "status" });
    }
    return this.#out;
  }

  /** Monotonic time at which the shell should feed `tick`; null: no timer needed. */
  deadline(): number | null {
    const t = this.#t;
    const d: (number | null)[] = [];
    const p = this.#phase;
    if (this.#role == "follower" || (p != "backoff" && !this.#hasSocket() && p != "token")) return null;
    d.push(this.#tickMono + t.tickMs);
    if (p == "backoff") d.push(this.#retryAt);
    if (p == "opening" || p == "auth") d.push(this.#openedAt + t.connectTimeoutMs);
    if (p == "ready") {
      d.push(this.#pingAt === null ? this.#lastRx + t.idlePingMs : this.#pingAt + t.probeTimeoutMs);
      if (this.#authAt !== null) d.push(this.#authAt + t.probeTimeoutMs);
      if (this.#hiddenAt !== null) d.push(this.#hiddenAt + t.hiddenGraceMs);
      if (!this.#refreshing) d.push(this.#refreshAt);
      for (const s of this.#subs.values()) d.push(s.retryAt);
    }
    const times = d.filter((x): x is number => x !== null);
    return times.length ? Math.min(...times) : null;
  }

  /** Whose cursors these are (the tabs layer tells followers). */
  currentUser(): string | null {
    return this.#user;
  }

  status(): Status {
    const now = this.#clock.now();
    const orgs: Record<string, OrgStatus> = {};
    for (const [org, s] of this.#subs) {
      if (!s.local) continue;
      orgs[org] = {
        state: this.#orgState(s),
        replayed: s.replayed,
        lagMs: s.lagMs,
        error: s.blocked,
      };
    }
    if (this.#role == "follower") {
      const r = this.#remote;
      return {
        state: r ? r.state : "connecting",
        attempt: r ? r.attempt : 0,
        retryAt: r ? r.retryAt : null,
        lastError: r ? r.lastError : null,
        closeCode: r ? r.closeCode : null,
        role: "follower",
        orgs,
      };
    }
    return {
      state: this.#publicState(),
      attempt: this.#attempt,
      retryAt:
        this.#phase == "backoff" && this.#retryAt !== null
          ? this.#clock.wall() + (this.#retryAt - now)
          : null,
      lastError: this.#lastError,
      closeCode: this.#closeCode,
      role: this.#role,
      orgs,
    };
  }

  // -- connecting ---------------------------------------------------------------------

  #publicState(): ConnectionState {
    switch (this.#phase) {
      case "ready":
        return "connected";
      case "token":
      case "opening":
      case "auth":
        return this.#everConnected || this.#attempt ? "reconnecting" : "connecting";
      case "backoff":
        return this.#online ? "reconnecting" : "offline";
      default:
        return this.#phase;
    }
  }

  #hasSocket(): boolean {
    return this.#phase == "opening" || this.#phase == "auth" || this.#phase == "ready";
  }

  #connectNow(): void {
    if (!this.#started || this.#role == "follower") return;
    if (this.#phase == "token" || this.#hasSocket()) return;
    if (!this.#online) {
      this.#phase = "offline";
      return;
    }
    this.#gen++;
    this.#phase = "token";
    this.#retryAt = null;
    this.#requestToken();
  }

  #requestToken(): void {
    const r = this.#tokenReq;
    if (r && r.gen == this.#gen && r.epoch == this.#epoch) return; // shared
    if (r) return; // one at a time: the stale one's result triggers the next request
    this.#tokenReq = { id: ++this.#tokenIds, gen: this.#gen, epoch: this.#epoch };
    this.#out.push({ type: "token", req: this.#tokenReq.id });
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
    if ("error" in result) {
      const msg = "getToken failed: " + String((result.error as Error)?.message ?? result.error);
      if (result.unauthorized) return this.#unauthorized(msg);
      this.#lastError = msg;
      if (this.#phase == "token") return this.#retryLater();
      this.#refreshing = false;
      this.#refreshAt = this.#clock.now() + this.#t.tokenRetryMs;
      return;
    }
    const token = result.token;
    if (!token) return this.#unauthorized("getToken returned no token");
    if (token == this.#refused) return this.#unauthorized("getToken returned the refused token");
    const user = this.#cfg.user ?? tokenSubject(token);
    if (this.#phase == "token") {
      this.#useToken(token, user);
      return this.#open();
    }
    this.#refreshing = false;
    if (user != this.#user) {
      // The server refuses a refresh for another subject: reconnect as the new user.
      this.#dropSocket(1000, "user changed");
      this.#useToken(token, user);
      this.#gen++;
      return this.#open();
    }
    this.#token = token;
    this.#authAt = this.#clock.now();
    this.#send({ type: "auth", token });
  }

  #useToken(token: string, user: string): void {
    this.#token = token;
    if (user != this.#user) {
      // Cursors and seen ids belong to a user: start over for another one.
      for (const s of this.#subs.values()) this.#resetSub(s);
      this.#user = user;
    }
  }

  #open(): void {
    this.#phase = "opening";
    this.#openedAt = this.#clock.now();
    this.#readyAt = null;
    this.#out.push({ type: "open", conn: this.#gen });
  }

  #unauthorized(why: string): void {
    if (this.#hasSocket()) this.#dropSocket(1000, "unauthorized");
    this.#phase = "unauthorized";
    this.#refreshing = false;
    this.#lastError = why;
    this.#token = null;
  }

  #halt(why: string): void {
    this.#epoch++;
    this.#started = false;
    if (this.#hasSocket()) this.#dropSocket(1000, why);
    this.#phase = "idle";
    this.#refreshing = false;
    this.#retryAt = null;
  }

  /** Close our socket; its close event, when it comes, is ignored. */
  #dropSocket(code: number, reason: string): void {
    this.#out.push({ type: "close", conn: this.#gen, code, reason });
    this.#gen++;
    this.#afterSocket();
  }

  #afterSocket(): void {
    this.#pingAt = this.#authAt = this.#expiresAt = this.#refreshAt = this.#refreshWall = null;
    this.#refreshing = false;
    for (const s of this.#subs.values()) {
      s.ref = null;
      s.live = false;
    }
  }

  #retryLater(delay?: number): void {
    this.#attempt++;
    const t = this.#t;
    const ceiling = Math.min(t.backoffMaxMs, t.backoffBaseMs * 2 ** (this.#attempt - 1));
    this.#retryAt = this.#clock.now() + (delay ?? this.#clock.random() * ceiling);
    this.#phase = this.#online ? "backoff" : "offline";
  }

  #onClosed(code: number): void {
    const now = this.#clock.now();
    const wasReady = this.#readyAt !== null;
    const stable = wasReady && now - this.#readyAt! >= this.#t.stableMs;
    if (stable) this.#attempt = 0;
    this.#gen++;
    this.#afterSocket();
    this.#phase = "idle";
    const [then, why] = closeRule(code);
    this.#closeCode = code;
    this.#lastError = `${why} (${code})`;
    const t = this.#t;
    switch (then) {
      case "stop":
        this.#phase = "failed";
        return;
      case "token":
        this.#refused = this.#token;
        this.#token = null;
        return wasReady ? this.#connectNow() : this.#retryLater();
      case "now":
        return stable ? this.#connectNow() : this.#retryLater();
      case "restart":
        return this.#retryLater(t.restartMinMs + this.#clock.random() * (t.restartMaxMs - t.restartMinMs));
      default:
        return this.#retryLater();
    }
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
    if (!f) return;
    switch (f.type) {
      case "ready": {
        this.#authAt = null;
        const wall = this.#clock.wall();
        this.#expiresAt = f.expires_at * 1000;
        const left = this.#expiresAt - wall;
        const margin = Math.min(this.#t.refreshMarginMs, left / 2);
        this.#refreshWall = this.#expiresAt - margin;
        this.#refreshAt = now + Math.max(0, left - margin);
        if (this.#phase == "auth") {
          this.#phase = "ready";
          this.#readyAt = now;
          this.#everConnected = true;
          this.#refused = null;
          this.#lastError = null;
          for (const [org, s] of this.#subs) this.#wire(org, s);
        }
        return;
      }
      case "error": {
        for (const [org, s] of this.#subs) {
          if (f.ref === null || s.ref != f.ref) continue;
          s.ref = null;
          if (f.code == "rate_limited" || f.code == "internal") {
            s.retryAt = now + this.#t.resubscribeMs * (1 + this.#clock.random());
          } else {
            s.blocked = `${f.code}: ${f.message}`;
            s.blockedState = f.code == "forbidden" ? "forbidden" : "error";
          }
          if (this.#role == "leader") this.#shareState(org, s);
          return;
        }
        this.#lastError = `server error ${f.code}: ${f.message}`;
        return;
      }
      case "pong":
        return;
      default:
        if (f.type == "subscribed" && this.#subs.get(f.org)?.ref != f.ref) return; // an older subscribe's
        if (this.#role == "leader") this.#out.push({ type: "share", data: data as string });
        this.#ingest(f);
    }
  }

  #onTick(): void {
    const now = this.#clock.now();
    const wall = this.#clock.wall();
    const jumped = Math.abs(wall - this.#tickWall - (now - this.#tickMono)) > this.#t.clockJumpMs;
    this.#tickMono = now;
    this.#tickWall = wall;
    if (this.#role == "follower") return;
    if (jumped) this.#wake(); // a sleep: the socket may be dead without a close event
    const t = this.#t;
    switch (this.#phase) {
      case "backoff":
        if (now >= this.#retryAt!) this.#connectNow();
        return;
      case "opening":
      case "auth":
        if (now - this.#openedAt >= t.connectTimeoutMs) {
          this.#dropSocket(4000, "connect timeout");
          this.#lastError = "no answer within " + t.connectTimeoutMs / 1000 + " s";
          this.#retryLater();
        }
        return;
      case "ready":
        break;
      default:
        return;
    }
    if (
      (this.#pingAt !== null && now - this.#pingAt >= t.probeTimeoutMs) ||
      (this.#authAt !== null && now - this.#authAt >= t.probeTimeoutMs)
    ) {
      this.#dropSocket(4000, "no pong");
      this.#lastError = "no answer to a ping within " + t.probeTimeoutMs / 1000 + " s";
      this.#phase = "idle";
      return this.#connectNow();
    }
    if (this.#hiddenAt !== null && now - this.#hiddenAt >= t.hiddenGraceMs) {
      this.#dropSocket(1000, "page hidden");
      this.#phase = "paused";
      return;
    }
    if (this.#refreshDue()) this.#refresh();
    if (this.#pingAt === null && this.#authAt === null && now - this.#lastRx >= t.idlePingMs)
      this.#probe();
    for (const [org, s] of this.#subs)
      if (s.retryAt !== null && now >= s.retryAt) {
        s.retryAt = null;
        this.#wire(org, s);
      }
  }

  #refreshDue(): boolean {
    return (
      !this.#refreshing &&
      this.#refreshAt !== null &&
      (this.#clock.now() >= this.#refreshAt || this.#clock.wall() >= this.#refreshWall!)
    );
  }

  #refresh(): void {
    this.#refreshing = true;
    this.#requestToken();
  }

  #probe(): void {
    if (this.#pingAt !== null || this.#authAt !== null) return;
    this.#pingAt = this.#clock.now();
    this.#send({ type: "ping", ref: "p" + ++this.#refs });
  }

  /** Back from hidden, offline, bfcache, frozen, or a sleep: connect now, or check the socket. */
  #wake(): void {
    switch (this.#phase) {
      case "backoff":
      case "paused":
      case "offline":
        this.#phase = "idle";
        return this.#connectNow();
      case "ready":
        // An expired token first: the in-band auth is then the probe (ready answers it).
        if (this.#refreshDue()) return this.#refresh();
        if (!this.#refreshing) this.#probe();
    }
  }

  #setRole(role: Role): void {
    if (role == this.#role) return;
    this.#role = role;
    if (role == "follower") {
      if (this.#hasSocket()) this.#dropSocket(1000, "another tab leads");
      this.#phase = "idle";
      this.#remote = null;
    } else {
      for (const s of this.#subs.values()) s.loaded = false; // other tabs may have saved newer cursors
      this.#phase = "idle";
      this.#connectNow();
    }
  }

  // -- subscriptions and delivery -----------------------------------------------------

  #newSub(): Sub {
    return {
      local: null,
      remote: null,
      ref: null,
      live: false,
      replayed: 0,
      resyncs: 0,
      blocked: null,
      blockedState: "error",
      retryAt: null,
      cursor: null,
      loaded: false,
      seen: new Set(),
      queue: [],
      busy: false,
      lagMs: null,
      savedCursor: null,
      savedIds: [],
    };
  }

  #resetSub(s: Sub): void {
    s.cursor = s.savedCursor = null;
    s.savedIds = [];
    s.seen.clear();
    s.loaded = false;
    s.queue = s.queue.filter((i) => i.k != "mark");
  }

  #want(org: string, who: "local" | "remote", options: SubOptions | null): void {
    let s = this.#subs.get(org);
    if (!s) {
      if (!options) return;
      this.#subs.set(org, (s = this.#newSub()));
    }
    const before = JSON.stringify(merge(s.local, s.remote));
    s[who] = options;
    if (who == "local") s.blocked = null;
    if (!s.local && !s.remote) {
      if (s.ref && this.#phase == "ready")
        this.#send({ type: "unsubscribe", ref: "u" + ++this.#refs, org });
      this.#subs.delete(org);
      return;
    }
    if (s.ref && before == JSON.stringify(merge(s.local, s.remote))) {
      if (who == "remote" && this.#role == "leader") this.#shareState(org, s);
      return;
    }
    this.#wire(org, s);
  }

  /** Send (or resend) the subscribe for an org, with its cursor. */
  #wire(org: string, s: Sub): void {
    if (this.#phase != "ready" || s.blocked) return;
    if (!s.loaded && this.#user !== null) {
      s.loaded = true;
      try {
        const rec = JSON.parse(this.#cfg.load(this.#storageKey(org)) ?? "null") as {
          c: string;
          i: number[];
        } | null;
        if (rec && typeof rec.c == "string") {
          if (s.cursor === null) s.cursor = rec.c;
          s.savedCursor = rec.c;
          s.savedIds = Array.isArray(rec.i) ? rec.i.slice(-SAVED_IDS) : [];
          for (const id of s.savedIds) this.#remember(s, id);
        }
      } catch {
        // unreadable record: resume without it
      }
    }
    const o = merge(s.local, s.remote);
    s.ref = "s" + ++this.#refs;
    s.live = false;
    s.replayed = 0;
    const frame: ClientFrame = { type: "subscribe", ref: s.ref, org, cursor: s.cursor };
    if (o.eventTypes) frame.event_types = o.eventTypes;
    if (o.coalesceMs) frame.coalesce_ms = o.coalesceMs;
    this.#send(frame);
    if (this.#role == "leader") this.#shareState(org, s);
  }

  /** Tell follower tabs where a subscription stands (they see frames, not our subscribes). */
  #shareState(org: string, s: Sub): void {
    const state = s.blocked ? s.blockedState : s.live ? "live" : "catching_up";
    this.#out.push({ type: "share", data: JSON.stringify({ type: "_org", org, state, why: s.blocked }) });
  }

  #onRemote(data: string): void {
    let f: { type?: string; org?: string; state?: OrgState; why?: string | null };
    try {
      f = JSON.parse(data) as typeof f;
    } catch {
      return;
    }
    if (f.type != "_org") {
      const frame = parseServerFrame(data);
      if (frame && frame.type != "ready" && frame.type != "pong" && frame.type != "error")
        this.#ingest(frame);
      return;
    }
    const s = this.#subs.get(f.org!);
    if (!s) return;
    if (f.state == "forbidden" || f.state == "error") {
      s.blocked = f.why ?? f.state;
      s.blockedState = f.state;
    } else {
      s.blocked = null;
      s.ref = "remote";
      if (f.state == "catching_up" && s.live) s.replayed = 0;
      s.live = f.state == "live";
    }
  }

  #orgState(s: Sub): OrgState {
    if (s.blocked) return s.blockedState;
    if (s.resyncs) return "resync";
    if (s.live) return "live";
    return s.ref ? "catching_up" : "pending";
  }

  #remember(s: Sub, id: number): void {
    s.seen.add(id);
    if (s.seen.size > this.#t.dedupeWindow) s.seen.delete(s.seen.values().next().value!);
  }

  #ingest(f: OrgFrame): void {
    const s = this.#subs.get(f.org);
    if (!s) return;
    switch (f.type) {
      case "event":
        if (s.seen.has(f.id)) return; // a repeat of the batch in flight
        this.#remember(s, f.id);
        s.cursor = f.cursor;
        if (!s.live) s.replayed++;
        return this.#enqueue(f.org, s, { k: "event", e: f, replayed: !s.live });
      case "subscribed":
        s.cursor = f.cursor;
        s.live = true;
        s.replayed = f.replayed;
        return this.#enqueue(f.org, s, { k: "mark", cursor: f.cursor });
      case "resync":
        s.cursor = f.cursor;
        s.resyncs++;
        return this.#enqueue(f.org, s, { k: "resync", reason: f.reason, cursor: f.cursor });
      case "unsubscribed":
        if (f.reason == "forbidden") {
          s.ref = null;
          s.blocked = "forbidden: membership revoked";
          s.blockedState = "forbidden";
        }
    }
  }

  #enqueue(org: string, s: Sub, item: Item): void {
    s.queue.push(item);
    this.#pump(org, s);
  }

  /** Hand the next item to the app, unless its handler is still busy. */
  #pump(org: string, s: Sub): void {
    while (!s.busy && s.queue.length) {
      const it = s.queue[0]!;
      if (it.k == "mark" || !s.local) {
        s.queue.shift();
        if (it.k == "resync") s.resyncs--;
        if (it.k == "mark") this.#save(org, s, it.cursor, null);
        continue;
      }
      s.busy = true;
      this.#out.push(
        it.k == "event"
          ? { type: "deliver", org, event: it.e, replayed: it.replayed }
          : { type: "resync", org, reason: it.reason },
      );
    }
  }

  #onHandled(org: string): void {
    const s = this.#subs.get(org);
    if (!s || !s.busy) return;
    s.busy = false;
    const it = s.queue.shift()!;
    if (it.k == "event") {
      s.lagMs = Math.max(0, this.#clock.wall() - Date.parse(it.e.created_at));
      this.#lagDirty = true;
      this.#save(org, s, it.e.cursor, it.e.id);
    } else if (it.k == "resync") {
      s.resyncs--;
      this.#save(org, s, it.cursor, null);
    }
    this.#pump(org, s);
  }

  #storageKey(org: string): string {
    return STORAGE_PREFIX + this.#cfg.endpoint + "|" + this.#user + "|" + org;
  }

  /** Persist where to resume, now that everything before it was handled. */
  #save(org: string, s: Sub, cursor: string, id: number | null): void {
    if (!s.local || this.#user === null) return;
    if (cursor != s.savedCursor) {
      s.savedCursor = cursor;
      s.savedIds = [];
    }
    if (id !== null) s.savedIds = [...s.savedIds.slice(1 - SAVED_IDS), id];
    const value = JSON.stringify({ c: cursor, i: s.savedIds });
    this.#out.push({ type: "persist", key: this.#storageKey(org), value });
  }

  /** What the status listeners care about (lag and counts ride along, unannounced). */
  #key(): string {
    const st = this.status();
    const orgs = Object.entries(st.orgs).map(([o, x]) => o + x.state + x.error);
    return [st.state, st.attempt, st.retryAt, st.lastError, st.role, ...orgs].join("|");
  }
}
