/**
 * From events to cache invalidation: `@pgrelay/client/invalidate`.
 *
 * A router maps event types (globs, the server's rule) to the query keys they
 * make stale. The invalidator collects keys until 50 ms pass without a new one
 * (at most 250 ms after the first), drops duplicates and invalidates them in
 * one call, so ten updates of one job make one refetch; a
 * `resync` invalidates everything of that org; while the page is hidden keys
 * are only collected, and flushed once when it is visible again.
 */
import { matchesType, type EventHandlers, type Timers } from "./client.js";
import type { EventFrame } from "./protocol.js";

export type QueryKey = readonly unknown[];
type Keys = QueryKey | readonly QueryKey[] | null | undefined | void;

/** Event type glob -> the keys that event makes stale. */
export type Routes = Record<string, (event: EventFrame) => Keys>;

/** All the keys an event makes stale, for every glob that matches its type. */
export function router(routes: Routes): (event: EventFrame) => QueryKey[] {
  const table = Object.entries(routes);
  return (e) =>
    table
      .filter(([glob]) => matchesType([glob], e.event_type))
      .flatMap(([, f]) => {
        const k = f(e);
        return !k ? [] : k.every(Array.isArray) && k.length ? (k as QueryKey[]) : [k as QueryKey];
      });
}

/** Whether a key belongs to an org (default: the org id is one of its parts). */
export const keyHasOrg = (key: QueryKey, org: string) => key.includes(org);

export interface InvalidatorOptions {
  route: (event: EventFrame) => QueryKey[];
  /** Mark these keys stale (one call per batch, no duplicates). */
  invalidate(keys: QueryKey[]): unknown;
  /** Mark every key of this org stale (after a resync). */
  invalidateOrg(org: string): unknown;
  /** Invalidate once no new key came for this long. Default 50. */
  windowMs?: number;
  /** ...but no later than this after the first key of a batch. Default 250. */
  maxWaitMs?: number;
  timers?: Timers;
  /** Default: document's visibility; null: always visible. */
  page?: { hidden(): boolean; onVisible(f: () => void): () => void } | null;
  belongsTo?: (key: QueryKey, org: string) => boolean;
}

export interface Invalidator {
  event(event: EventFrame): void;
  resync(org: string): void;
  /** Invalidate now what was collected. */
  flush(): void;
  /** Handlers for relay.subscribe / useRelay. */
  handlers: EventHandlers;
  dispose(): void;
}

function documentPage(): InvalidatorOptions["page"] {
  if (typeof document == "undefined") return null;
  return {
    hidden: () => document.hidden,
    onVisible(f) {
      const on = () => !document.hidden && f();
      document.addEventListener("visibilitychange", on);
      return () => document.removeEventListener("visibilitychange", on);
    },
  };
}

export function createInvalidator(o: InvalidatorOptions): Invalidator {
  const timers = o.timers ?? {
    set: (f, ms) => setTimeout(f, ms),
    clear: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
  };
  const page = o.page === undefined ? documentPage() : o.page;
  const belongsTo = o.belongsTo ?? keyHasOrg;
  const keys = new Map<string, QueryKey>();
  const orgs = new Set<string>();
  let quiet: unknown = null; // windowMs after the last key
  let deadline: unknown = null; // maxWaitMs after the first key of the batch

  const schedule = () => {
    if (page?.hidden()) return;
    if (quiet !== null) timers.clear(quiet);
    quiet = timers.set(flush, o.windowMs ?? 50);
    deadline ??= timers.set(flush, o.maxWaitMs ?? 250);
  };
  function flush() {
    for (const t of [quiet, deadline]) if (t !== null) timers.clear(t);
    quiet = deadline = null;
    if (page?.hidden()) return; // kept for when the page is visible again
    const resynced = [...orgs];
    const stale = [...keys.values()].filter((k) => !resynced.some((org) => belongsTo(k, org)));
    keys.clear();
    orgs.clear();
    for (const org of resynced) o.invalidateOrg(org);
    if (stale.length) o.invalidate(stale);
  }
  const unlisten = page?.onVisible(flush) ?? (() => {});

  const inv: Invalidator = {
    event(e) {
      for (const k of o.route(e)) keys.set(JSON.stringify(k), k);
      if (keys.size) schedule();
    },
    resync(org) {
      orgs.add(org);
      schedule();
    },
    flush,
    handlers: {
      onEvent: (e) => inv.event(e),
      onResync: (org) => inv.resync(org),
    },
    dispose() {
      for (const t of [quiet, deadline]) if (t !== null) timers.clear(t);
      unlisten();
    },
  };
  return inv;
}
