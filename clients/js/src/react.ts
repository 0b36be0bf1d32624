/**
 * React bindings: `@pgrelay/client/react`. Thin: the client does the work.
 *
 *   <RelayProvider relay={relay}> ... </RelayProvider>
 *   useRelay(org, { onEvent, onResync }, { eventTypes })   // subscribed while mounted
 *   const status = useRelayStatus()                       // re-renders on changes of state
 */
import {
  createContext,
  createElement,
  useContext,
  useEffect,
  useRef,
  useSyncExternalStore,
  type ReactNode,
} from "react";
import type { EventHandlers, Relay } from "./client.js";
import type { Status, SubOptions } from "./machine.js";

const RelayContext = createContext<Relay | null>(null);

export function RelayProvider(props: { relay: Relay; children?: ReactNode }) {
  return createElement(RelayContext.Provider, { value: props.relay }, props.children);
}

export function useRelayClient(): Relay {
  const relay = useContext(RelayContext);
  if (!relay) throw new Error("useRelay needs a <RelayProvider relay={...}> above it");
  return relay;
}

/** Follow `org` while mounted (none while org is null). Handlers may change on every render. */
export function useRelay(
  org: string | null | undefined,
  handlers: EventHandlers,
  options?: SubOptions,
): void {
  const relay = useRelayClient();
  const latest = useRef(handlers);
  useEffect(() => {
    latest.current = handlers;
  });
  const opts = JSON.stringify(options ?? {});
  useEffect(() => {
    if (!org) return;
    return relay.subscribe(
      org,
      {
        onEvent: (e, info) => latest.current.onEvent?.(e, info),
        onResync: (o, reason) => latest.current.onResync?.(o, reason),
      },
      JSON.parse(opts) as SubOptions,
    );
  }, [relay, org, opts]);
}

/** The relay's status; re-renders when its state changes (read lagMs from it, not a timer). */
export function useRelayStatus(): Status {
  const relay = useRelayClient();
  const snapshot = useRef<{ relay: Relay; status: Status } | null>(null);
  const read = () => {
    if (snapshot.current?.relay !== relay) snapshot.current = { relay, status: relay.status() };
    return snapshot.current.status;
  };
  return useSyncExternalStore(
    (changed) =>
      relay.onStatus((status) => {
        snapshot.current = { relay, status };
        changed();
      }),
    read,
    read,
  );
}
