/**
 * TanStack Query: `@pgrelay/client/tanstack-query`.
 *
 *   useRelayInvalidation(org, router({ "job.*": (e) => [["jobs", e.org]] }))
 *
 * Keys are matched as TanStack's `invalidateQueries({ queryKey })` matches them
 * (a prefix), in one `invalidateQueries` call per batch: a query several keys
 * match is refetched once. Only active queries refetch; the rest become stale.
 */
import { partialMatchKey, useQueryClient, type QueryClient } from "@tanstack/react-query";
import { useEffect, useMemo, useRef } from "react";
import type { SubOptions } from "./machine.js";
import {
  createInvalidator,
  keyHasOrg,
  type Invalidator,
  type InvalidatorOptions,
  type QueryKey,
} from "./invalidate.js";
import { useRelay } from "./react.js";

type Extra = Omit<InvalidatorOptions, "route" | "invalidate" | "invalidateOrg">;

export function tanstackInvalidator(
  client: QueryClient,
  route: (e: Parameters<InvalidatorOptions["route"]>[0]) => QueryKey[],
  options: Extra = {},
): Invalidator {
  const belongsTo = options.belongsTo ?? keyHasOrg;
  return createInvalidator({
    ...options,
    route,
    invalidate: (keys) =>
      client.invalidateQueries({
        predicate: (q) => keys.some((k) => partialMatchKey(q.queryKey, k as unknown[])),
      }),
    invalidateOrg: (org) =>
      client.invalidateQueries({ predicate: (q) => belongsTo(q.queryKey, org) }),
  });
}

/** Follow `org` while mounted and invalidate what its events make stale. */
export function useRelayInvalidation(
  org: string | null | undefined,
  route: InvalidatorOptions["route"],
  options?: Extra & SubOptions,
): void {
  const client = useQueryClient();
  const latest = useRef(route);
  latest.current = route;
  const inv = useMemo(
    () => tanstackInvalidator(client, (e) => latest.current(e), options),
    // options are read once
    [client],
  );
  useEffect(() => () => inv.dispose(), [inv]);
  useRelay(org, inv.handlers, options);
}
