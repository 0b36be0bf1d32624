/**
 * The React, TanStack Query and SWR bindings on a page, over a fake server
 * that lives in the page (the SDK's injectable WebSocket). test/unit/bindings.test.ts
 * loads this bundle into a real Chromium and drives `window.server`.
 */
import { QueryClient, QueryClientProvider, useQuery } from "@tanstack/react-query";
import { useState } from "react";
import { createRoot } from "react-dom/client";
import useSWR, { SWRConfig } from "swr";
import { createRelay, memoryStorage, type WebSocketLike } from "../../src/index.js";
import { router } from "../../src/invalidate.js";
import { RelayProvider, useRelay, useRelayStatus } from "../../src/react.js";
import { useRelaySWR } from "../../src/swr.js";
import { useRelayInvalidation } from "../../src/tanstack-query.js";

const ORG = "6f1c6f1c-0000-4000-8000-000000000001";
let ids = 0;

class PageServerSocket implements WebSocketLike {
  static current: PageServerSocket | null = null;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  constructor() {
    PageServerSocket.current = this;
    setTimeout(() => this.onopen?.({}));
  }
  send(data: string) {
    const f = JSON.parse(data) as { type: string; ref: string; org: string };
    server.sent.push(f.type);
    if (f.type == "auth")
      this.frame({ type: "ready", connection_id: "c", expires_at: Date.now() / 1000 + 3600 });
    if (f.type == "subscribe")
      this.frame({ type: "subscribed", ref: f.ref, org: f.org, cursor: "c0", replayed: 0 });
    if (f.type == "ping") this.frame({ type: "pong", ref: f.ref });
  }
  frame(f: object) {
    setTimeout(() => this.onmessage?.({ data: JSON.stringify(f) }));
  }
  close() {}
}

const server = {
  sent: [] as string[],
  event(type: string, entityId: string) {
    PageServerSocket.current!.frame({
      type: "event",
      org: ORG,
      id: ++ids,
      event_type: type,
      entity_type: "job",
      entity_id: entityId,
      actor_id: null,
      payload: {},
      created_at: new Date().toISOString(),
      cursor: "c" + ids,
    });
  },
  resync() {
    PageServerSocket.current!.frame({
      type: "resync",
      org: ORG,
      reason: "cursor_expired",
      cursor: "r",
    });
  },
  drop(code: number) {
    PageServerSocket.current!.onclose?.({ code });
  },
};
const fetches = { tanstack: 0, swr: 0 };
Object.assign(window, { server, fetches });

const routes = router({ "job.*": (e) => ["jobs", e.org] });

function JobsWithTanStack() {
  useRelayInvalidation(ORG, routes);
  const q = useQuery({
    queryKey: ["jobs", ORG],
    queryFn: async () => ++fetches.tanstack,
    staleTime: Infinity,
  });
  return <p id="tanstack">{q.data}</p>;
}

function JobsWithSWR() {
  useRelaySWR(ORG, routes);
  const { data } = useSWR(["jobs", ORG], async () => ++fetches.swr, {
    dedupingInterval: 0,
    revalidateOnFocus: false,
  });
  return <p id="swr">{data}</p>;
}

function Status() {
  const s = useRelayStatus();
  return (
    <p id="status" data-state={s.state} data-org={s.orgs[ORG]?.state ?? ""}>
      {s.state}
    </p>
  );
}

function EventCount() {
  const [n, setN] = useState(0);
  useRelay(ORG, { onEvent: () => setN((x) => x + 1) }, { eventTypes: ["job.*"] });
  return <p id="events">{n}</p>;
}

const relay = createRelay({
  url: "ws://page-server/v1",
  getToken: () => "e30.eyJzdWIiOiJ1c2VyLTEifQ.sig",
  WebSocket: PageServerSocket,
  storage: memoryStorage(),
});

const root = document.body.appendChild(document.createElement("div"));
createRoot(root).render(
  <RelayProvider relay={relay}>
    <QueryClientProvider client={new QueryClient()}>
      <SWRConfig value={{ provider: () => new Map() }}>
        <Status />
        <JobsWithTanStack />
        <JobsWithSWR />
        <EventCount />
      </SWRConfig>
    </QueryClientProvider>
  </RelayProvider>,
);
