/**
 * SWR: `@pgrelay/client/swr`.
 *
 *   useRelaySWR(org, router({ "job.*": (e) => [["jobs", e.org]] }))
 *
 * A key matches an SWR key that is an array starting with the same parts, or a
 * string equal to a one-part key. One `mutate(filter)` per batch revalidates them.
 */
import { useSWRConfig, type ScopedMutator } from "swr";
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

/** Whether SWR key `swrKey` is one that `key` names. */
export function swrKeyMatches(swrKey: unknown, key: QueryKey): boolean {
  return Array.isArray(swrKey)
    ? key.every((part, i) => swrKey[i] === part)
    : key.length == 1 && swrKey === key[0];
}

export function swrInvalidator(
  mutate: ScopedMutator,
  route: InvalidatorOptions["route"],
  options: Extra = {},
): Invalidator {
  const belongsTo = options.belongsTo ?? keyHasOrg;
  return createInvalidator({
    ...options,
    route,
    invalidate: (keys) => mutate((k) => keys.some((key) => swrKeyMatches(k, key))),
    invalidateOrg: (org) =>
      mutate((k) =>
        Array.isArray(k) ? belongsTo(k, org) : typeof k == "string" && k.includes(org),
      ),
  });
}

/** Follow `org` while mounted and revalidate the SWR keys its events make stale. */
export function useRelaySWR(
  org: string | null | undefined,
  route: InvalidatorOptions["route"],
  options?: Extra & SubOptions,
): void {
  const { mutate } = useSWRConfig();
  const latest = useRef(route);
  latest.current = route;
  const inv = useMemo(
    () => swrInvalidator(mutate, (e) => latest.current(e), options),
    // options are read once
    [mutate],
  );
  useEffect(() => () => inv.dispose(), [inv]);
  useRelay(org, inv.handlers, options);
}
