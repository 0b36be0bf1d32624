/**
 * One connection per browser, shared by its tabs: `@pgrelay/client/tabs`.
 *
 * The tab that holds the Web Lock is the leader: it runs an ordinary core
 * client (createRelay) and subscribes each org that any tab follows, with one
 * listener per org that posts every event on a BroadcastChannel and hands it to
 * its own app. The other tabs (followers) have no socket: they tell the leader
 * what they follow, and deliver what it posts. Each tab drops repeated ids and
 * runs its handlers one event at a time per org, so when the leader's tab
 * closes and another tab takes the lock (at once: the browser grants it to the
 * next waiter), the new leader resumes from the saved cursor and the repeats
 * it replays reach no app twice.
 *
 * The leader saves a cursor once its own handlers finished and the event was
 * posted to the other tabs. Without Web Locks (or BroadcastChannel) every tab
 * is on its own (`role: "solo"`). Built only on the core's public API.
 */
import {
  createRelay,
  matchesType,
  browserPage,
  type EventHandlers,
  type PageInput,
  type Relay,
  type RelayClient,
  type RelayOptions,
} from "./client.js";
import { mergeOptions, type Status, type SubOptions } from "./machine.js";
import type { EventFrame, ResyncReason } from "./protocol.js";

/** The part of BroadcastChannel used here. */
export interface ChannelLike {
  postMessage(message: unknown): void;
  onmessage: ((ev: { data: unknown }) => void) | null;
  close(): void;
}
/** The part of navigator.locks used here. */
export interface LocksLike {
  request(name: string, callback: () => Promise<void>): Promise<unknown>;
}

export interface SharedRelayOptions extends RelayOptions {
  /** Default: navigator.locks (none: every tab on its own). */
  locks?: LocksLike | null;
  /** Default: a BroadcastChannel named after the URL. Closed by dispose(). */
  channel?: ChannelLike | null;
}

export type Role = "solo" | "leader" | "follower";
export type SharedStatus = Status & { role: Role };

export interface SharedRelay extends Relay {
  status(): SharedStatus;
  onStatus(listener: (status: SharedStatus) => void): () => void;
  readonly role: Role;
  /** Leave: post goodbye, give up the lock (another tab takes over), close the channel. */
  dispose(): void;
}

type Msg =
  | { t: "want"; tab: string; orgs: Record<string, SubOptions>; visible: boolean }
  | { t: "hello" }
  | { t: "bye"; tab: string }
  | { t: "ev"; org: string; e: EventFrame; replayed: boolean }
  | { t: "rs"; org: string; reason: ResyncReason }
  | { t: "st"; s: Status }
  | { t: "wake" }
  | { t: "out" };

interface Listener {
  h: EventHandlers;
  o: SubOptions;
}

/** Ids remembered per org to drop repeats. */
const SEEN = 10_000;

export function createSharedRelay(options: SharedRelayOptions): SharedRelay {
  const tab = Math.random().toString(36).slice(2);
  const locks =
    options.locks === undefined
      ? (globalThis.navigator as { locks?: LocksLike } | undefined)?.locks
      : options.locks;
  const channel: ChannelLike | null | undefined =
    options.channel === undefined
      ? typeof BroadcastChannel == "function"
        ? (new BroadcastChannel("pgrelay|" + options.url) as unknown as ChannelLike)
        : null
      : options.channel;
  const report = (e: unknown) =>
    options.onError
      ? options.onError(e)
      : (globalThis as { reportError?: (e: unknown) => void }).reportError?.(e);

  let role: Role = locks && channel ? "follower" : "solo";
  let relay: RelayClient | null = null;
  let leaderStatus: Status | null = null;
  let release: (() => void) | null = null;
  let disposed = false;
  const mine = new Map<string, Set<Listener>>();
  const statusListeners = new Set<(s: SharedStatus) => void>();
  const seen = new Map<string, Set<number>>();
  const tails = new Map<string, Promise<unknown>>();
  // leader only: what the other tabs follow, whether they are visible, our listener per org
  const wants = new Map<string, Record<string, SubOptions>>();
  const visibleTabs = new Map<string, boolean>();
  const wired = new Map<string, { key: string; off: () => void }>();
  let emitPage: ((i: PageInput) => void) | null = null;
  let ownVisible = true;

  const post = (m: Msg) => channel?.postMessage(m);

  /** This tab's handlers for an org, one item at a time; resolves when they finished. */
  function deliver(org: string, run: (h: EventHandlers) => unknown, type?: string) {
    const ls = [...(mine.get(org) ?? [])].filter(
      (l) => type === undefined || matchesType(l.o.eventTypes, type),
    );
    const next = (tails.get(org) ?? Promise.resolve()).then(() =>
      Promise.all(ls.map((l) => (async () => run(l.h))().catch(report))),
    );
    tails.set(org, next);
    return next;
  }
  function onEvent(org: string, e: EventFrame, replayed: boolean) {
    let ids = seen.get(org);
    if (!ids) seen.set(org, (ids = new Set()));
    if (ids.has(e.id)) return;
    ids.add(e.id);
    if (ids.size > SEEN) ids.delete(ids.values().next().value!);
    return deliver(org, (h) => h.onEvent?.(e, { replayed }), e.event_type);
  }
  const onResync = (org: string, reason: ResyncReason) =>
    deliver(org, (h) => h.onResync?.(org, reason));

  const myWants = () =>
    Object.fromEntries(
      [...mine].map(([org, ls]) => [org, mergeOptions([...ls].map((l) => l.o))!] as const),
    );

  function status(): SharedStatus {
    const s = relay
      ? relay.status()
      : (leaderStatus ?? {
          state: "connecting",
          attempt: 0,
          retryAt: null,
          lastError: null,
          closeCode: null,
          orgs: {},
        });
    const orgs = Object.fromEntries(Object.entries(s.orgs).filter(([org]) => mine.has(org)));
    return { ...s, orgs, role };
  }
  const announce = () => {
    const s = status();
    statusListeners.forEach((l) => l(s));
  };

  /** Leader: subscribe every org any tab follows, with the union of their options. */
  function sync() {
    if (!relay) return;
    const all = new Map<string, (SubOptions | null)[]>();
    for (const w of [myWants(), ...wants.values()])
      for (const [org, o] of Object.entries(w)) all.set(org, [...(all.get(org) ?? []), o]);
    for (const [org, w] of wired)
      if (!all.has(org)) {
        w.off();
        wired.delete(org);
      }
    for (const [org, list] of all) {
      const o = mergeOptions(list)!;
      const key = JSON.stringify(o);
      const had = wired.get(org);
      if (had?.key == key) continue;
      const off = relay.subscribe(
        org,
        {
          onEvent: (e, { replayed }) => {
            post({ t: "ev", org, e, replayed });
            return onEvent(org, e, replayed);
          },
          onResync: (_, reason) => {
            post({ t: "rs", org, reason });
            return onResync(org, reason);
          },
        },
        o,
      );
      had?.off();
      wired.set(org, { key, off });
    }
  }

  function pageVisible() {
    return ownVisible || [...visibleTabs.values()].some(Boolean);
  }

  function lead() {
    if (disposed) return;
    role = role == "solo" ? "solo" : "leader";
    relay = createRelay({
      ...options,
      autoStart: false,
      page: {
        listen(emit) {
          emitPage = emit;
          if (!pageVisible()) emit({ type: "visible", visible: false });
          return () => (emitPage = null);
        },
      },
    });
    relay.onStatus((s) => {
      post({ t: "st", s });
      announce();
    });
    sync();
    relay.start();
    post({ t: "hello" });
    announce();
  }

  function onMessage(m: Msg) {
    switch (m.t) {
      case "want":
        if (!relay) return;
        wants.set(m.tab, m.orgs);
        visibleTabs.set(m.tab, m.visible);
        emitPage?.({ type: "visible", visible: pageVisible() });
        sync();
        post({ t: "st", s: relay.status() });
        return;
      case "bye":
        wants.delete(m.tab);
        visibleTabs.delete(m.tab);
        emitPage?.({ type: "visible", visible: pageVisible() });
        return sync();
      case "hello":
        return tellLeader();
      case "wake":
        return emitPage?.({ type: "wake" });
      case "st":
        if (relay) return;
        leaderStatus = m.s;
        return announce();
      case "ev":
        if (!relay) void onEvent(m.org, m.e, m.replayed);
        return;
      case "rs":
        if (!relay) void onResync(m.org, m.reason);
        return;
      case "out":
        return signOutHere();
    }
  }

  const tellLeader = () => {
    if (role == "follower") post({ t: "want", tab, orgs: myWants(), visible: ownVisible });
  };

  function signOutHere() {
    mine.clear();
    seen.clear();
    if (relay) {
      relay.signOut();
      wired.clear();
    }
    announce();
  }

  // This tab's own page: the leader's client hears it (merged with the other tabs'), followers tell the leader.
  const unlistenPage =
    (options.page === undefined ? browserPage() : options.page)?.listen((i) => {
      if (i.type == "visible") ownVisible = i.visible;
      if (relay) emitPage?.(i.type == "visible" ? { type: "visible", visible: pageVisible() } : i);
      else if (i.type == "visible") tellLeader();
      if (!relay && (i.type == "wake" || (i.type == "online" && i.online))) post({ t: "wake" });
    }) ?? (() => {});

  if (channel) channel.onmessage = (ev: { data: unknown }) => onMessage(ev.data as Msg);
  if (role == "solo") lead();
  else {
    void locks!.request("pgrelay|" + options.url, () => {
      lead();
      return new Promise<void>((r) => (release = r));
    });
    tellLeader();
  }
  const onHide = () => post({ t: "bye", tab });
  globalThis.addEventListener?.("pagehide", onHide);

  return {
    get role() {
      return role;
    },
    subscribe(org, handlers, opts = {}) {
      const l: Listener = { h: handlers, o: opts };
      let set = mine.get(org);
      if (!set) mine.set(org, (set = new Set()));
      set.add(l);
      sync();
      tellLeader();
      return () => {
        if (!set.delete(l)) return;
        if (!set.size) mine.delete(org);
        sync();
        tellLeader();
      };
    },
    status,
    onStatus(listener) {
      statusListeners.add(listener);
      return () => void statusListeners.delete(listener);
    },
    start: () => relay?.start(),
    stop: () => relay?.stop(),
    reconnect: () => (relay ? relay.reconnect() : post({ t: "wake" })),
    signOut() {
      post({ t: "out" });
      signOutHere();
    },
    dispose() {
      disposed = true;
      onHide();
      globalThis.removeEventListener?.("pagehide", onHide);
      unlistenPage();
      relay?.dispose();
      relay = null;
      release?.();
      channel?.close();
    },
  };
}
