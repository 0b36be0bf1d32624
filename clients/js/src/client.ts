/**
 * The shell around the machine: one WebSocket, one timer, the page's events,
 * the app's handlers and the storage. It decides nothing; machine.ts does.
 */
import {
  Machine,
  mergeOptions,
  type Action,
  type Clock,
  type Input,
  type Status,
  type SubOptions,
  type Timing,
} from "./machine.js";
import type { EventFrame, ResyncReason } from "./protocol.js";
import { clearPrefix, memoryStorage, safeStorage, type CursorStorage } from "./storage.js";

/** The part of the WebSocket API this client uses (the browser's, or Node's `ws`). */
export interface WebSocketLike {
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketClass = new (url: string) => WebSocketLike;

export interface Timers {
  set(fn: () => void, ms: number): unknown;
  clear(handle: unknown): void;
}

/** What the page tells the machine: visible or hidden, online or offline, woken up. */
export type PageInput = Extract<Input, { type: "visible" | "online" | "wake" }>;

/** Page lifecycle as the machine needs it; `browserPage()` reads window and document. */
export interface PageEvents {
  /** Emit the current state (when hidden or offline) at once, then every change; returns the stop. */
  listen(emit: (input: PageInput) => void): () => void;
}

export interface EventHandlers {
  /** One event; the cursor after it is saved once this returns (or its promise settles). */
  onEvent?(event: EventFrame, info: { replayed: boolean }): unknown;
  /** The server cannot say exactly what was missed: refetch everything of `org`. */
  onResync?(org: string, reason: ResyncReason): unknown;
}

export interface RelayOptions extends Partial<Timing> {
  /** `wss://host/v1`. */
  url: string;
  /** Called before every connect, on 4001 and ahead of expiry. Return null, or throw
   * `UnauthorizedError` (or an error with status 401/403), when the user is signed out. */
  getToken(): string | null | Promise<string | null>;
  /** Keys the saved cursors (with the URL and the org); default: the token's `sub`. */
  user?: string;
  /** Default: localStorage, falling back to memory when it throws. */
  storage?: CursorStorage;
  /** Default: globalThis.WebSocket. In Node: `import WebSocket from "ws"`. */
  WebSocket?: WebSocketClass;
  clock?: Clock;
  timers?: Timers;
  /** Default: the browser's window and document; null: none (Node). */
  page?: PageEvents | null;
  /** A handler threw (default: reportError where it exists). */
  onError?(error: unknown): void;
  /** Default true. */
  autoStart?: boolean;
}

/** Throw this (or any error with status 401 or 403) from getToken when the user is signed out. */
export class UnauthorizedError extends Error {
  status = 401;
}

const isUnauthorized = (e: unknown) => [401, 403].includes((e as { status?: number })?.status!);

/** `job.*` matches `job.updated` and `job.step.done`; `*` everything (the server's rule). */
export function matchesType(globs: readonly string[] | null | undefined, type: string): boolean {
  return (
    !globs ||
    globs.some((g) =>
      new RegExp("^" + g.replace(/[.]/g, "\\.").replace(/\*/g, ".+") + "$").test(type),
    )
  );
}

/** Window events; `resume` (a frozen page thawed) fires on document and does not bubble. */
const PAGE_EVENTS = ["visibilitychange", "online", "offline", "pageshow"];

export function browserPage(): PageEvents | null {
  return typeof document == "undefined"
    ? null
    : {
        listen(emit) {
          const f = (e: Event) => {
            const t = e.type;
            if (t != "pageshow" || (e as PageTransitionEvent).persisted)
              emit(
                t == "visibilitychange"
                  ? { type: "visible", visible: !document.hidden }
                  : t == "online" || t == "offline"
                    ? { type: "online", online: t == "online" }
                    : { type: "wake" }, // back from the bfcache, or a frozen page resumed
              );
          };
          if (document.hidden) emit({ type: "visible", visible: false });
          if (!navigator.onLine) emit({ type: "online", online: false });
          PAGE_EVENTS.forEach((t) => addEventListener(t, f));
          document.addEventListener("resume", f);
          return () => {
            PAGE_EVENTS.forEach((t) => removeEventListener(t, f));
            document.removeEventListener("resume", f);
          };
        },
      };
}

interface Listener {
  h: EventHandlers;
  o: SubOptions;
}

/** The app's view of a relay connection (core, or shared between tabs). */
export interface Relay {
  /** Follow an org; returns the function that stops it. */
  subscribe(org: string, handlers: EventHandlers, options?: SubOptions): () => void;
  /** The current status, read now (listeners hear of changes of state, not of lag). */
  status(): Status;
  onStatus(listener: (status: Status) => void): () => void;
  start(): void;
  stop(): void;
  /** Try again now (after `failed` or `unauthorized`). */
  reconnect(): void;
  /** Forget the token, the saved cursors of this URL and every subscription. */
  signOut(): void;
}

export class RelayClient implements Relay {
  readonly machine: Machine;
  #clock: Clock;
  #storage: CursorStorage;
  #timers: Timers;
  #ws: WebSocketLike | null = null;
  #wsConn = -1;
  #timer: unknown = null;
  #listeners = new Map<string, Set<Listener>>();
  #statusListeners = new Set<(s: Status) => void>();
  #queue: Input[] = [];
  #running = false;
  #unlisten: () => void;

  #o: RelayOptions;

  constructor(o: RelayOptions) {
    this.#o = o;
    this.#clock = o.clock ?? {
      now: () => performance.now(),
      wall: () => Date.now(),
      random: Math.random,
    };
    this.#storage = o.storage ?? safeStorage();
    this.#timers = o.timers ?? {
      set: (f, ms) => setTimeout(f, ms),
      clear: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
    };
    this.machine = new Machine({
      ...o,
      clock: this.#clock,
      endpoint: o.url,
      load: (k) => this.#storage.getItem(k),
    });
    const page = o.page === undefined ? browserPage() : o.page;
    this.#unlisten = page ? page.listen((i) => this.input(i)) : () => {};
    if (o.autoStart !== false) this.start();
  }

  subscribe(org: string, handlers: EventHandlers, options: SubOptions = {}): () => void {
    const l: Listener = { h: handlers, o: options };
    let set = this.#listeners.get(org);
    if (!set) this.#listeners.set(org, (set = new Set()));
    set.add(l);
    this.#want(org);
    return () => {
      if (set.delete(l)) this.#want(org);
    };
  }

  #options(org: string): SubOptions | null {
    return mergeOptions([...(this.#listeners.get(org) ?? [])].map((l) => l.o));
  }

  #want(org: string): void {
    const options = this.#options(org);
    if (!options) this.#listeners.delete(org);
    this.input({ type: "want", org, options });
  }

  status(): Status {
    return this.machine.status();
  }

  onStatus(listener: (s: Status) => void): () => void {
    this.#statusListeners.add(listener);
    return () => void this.#statusListeners.delete(listener);
  }

  start(): void {
    this.input({ type: "start" });
  }
  stop(): void {
    this.input({ type: "stop" });
  }
  reconnect(): void {
    this.stop();
    this.start();
  }
  signOut(): void {
    this.#listeners.clear();
    this.input({ type: "signOut" });
  }
  /** Stop, and let go of the page's events. */
  dispose(): void {
    this.stop();
    this.#unlisten();
    if (this.#timer !== null) this.#timers.clear(this.#timer);
  }

  /** Feed the machine; inputs that arrive while actions run wait their turn. */
  input(i: Input): void {
    this.#queue.push(i);
    if (this.#running) return;
    this.#running = true;
    try {
      let next: Input | undefined;
      while ((next = this.#queue.shift())) this.machine.handle(next).forEach(this.#run, this);
    } finally {
      this.#running = false;
    }
    if (this.#timer !== null) this.#timers.clear(this.#timer);
    this.#timer = null;
    const at = this.machine.deadline();
    if (at !== null)
      this.#timer = this.#timers.set(
        () => {
          this.#timer = null;
          this.input({ type: "tick" });
        },
        Math.max(0, at - this.#clock.now()),
      );
  }

  #report(e: unknown): void {
    if (this.#o.onError) this.#o.onError(e);
    else (globalThis as { reportError?: (e: unknown) => void }).reportError?.(e);
  }

  /** Call every matching handler; then tell the machine (the cursor is saved after that). */
  #call(org: string, f: (h: EventHandlers) => unknown, type?: string): void {
    const ls = [...(this.#listeners.get(org) ?? [])].filter(
      (l) => type === undefined || matchesType(l.o.eventTypes, type),
    );
    void Promise.all(
      ls.map((l) => (async () => f(l.h))().catch((e: unknown) => this.#report(e))),
    ).then(() => this.input({ type: "handled", org }));
  }

  #run(a: Action): void {
    switch (a.type) {
      case "token": {
        const req = a.req;
        Promise.resolve()
          .then(() => this.#o.getToken())
          .then(
            (token) => this.input({ type: "token", req, result: { token } }),
            (error: unknown) =>
              this.input({
                type: "token",
                req,
                result: { error, unauthorized: isUnauthorized(error) },
              }),
          );
        return;
      }
      case "open": {
        const conn = a.conn;
        this.#wsConn = conn;
        try {
          const W = this.#o.WebSocket ?? (globalThis as { WebSocket?: WebSocketClass }).WebSocket!;
          const ws = (this.#ws = new W(this.#o.url));
          const mine = () => this.#wsConn == conn;
          ws.onopen = () => mine() && this.input({ type: "open", conn });
          ws.onmessage = (e) => mine() && this.input({ type: "frame", conn, data: e.data });
          ws.onclose = (e) => mine() && this.input({ type: "closed", conn, code: e.code });
          ws.onerror = () => {};
        } catch {
          this.#ws = null;
          void Promise.resolve().then(() => this.input({ type: "closed", conn, code: 1006 }));
        }
        return;
      }
      case "send":
        if (this.#wsConn == a.conn && this.#ws)
          try {
            this.#ws.send(JSON.stringify(a.frame));
          } catch {
            // not open: the close event (or the probe) takes it from here
          }
        return;
      case "close": {
        const ws = this.#ws;
        if (this.#wsConn != a.conn || !ws) return;
        this.#ws = null;
        this.#wsConn = -1;
        ws.onopen = ws.onmessage = ws.onclose = null;
        try {
          ws.close(a.code, a.reason);
        } catch {
          // already closed
        }
        return;
      }
      case "deliver":
        return this.#call(
          a.org,
          (h) => h.onEvent?.(a.event, { replayed: a.replayed }),
          a.event.event_type,
        );
      case "resync":
        return this.#call(a.org, (h) => h.onResync?.(a.org, a.reason));
      case "persist":
        try {
          return this.#storage.setItem(a.key, a.value);
        } catch {
          // full, or private mode: keep cursors in memory from now on
          (this.#storage = memoryStorage()).setItem(a.key, a.value);
          return;
        }
      case "clear":
        return clearPrefix(this.#storage, a.prefix);
      case "status": {
        const s = this.machine.status();
        this.#statusListeners.forEach((l) => l(s));
      }
    }
  }
}

export function createRelay(options: RelayOptions): RelayClient {
  return new RelayClient(options);
}
