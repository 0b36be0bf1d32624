// The README's "For web apps" example, type-checked by `tsc` (make lint and the
// type-test unit test), so the example in the docs compiles against the package.
import { QueryClient, QueryClientProvider, useQuery } from "@tanstack/react-query";
import { createRoot } from "react-dom/client";
import { router } from "@pgrelay/client/invalidate";
import { RelayProvider, useRelayStatus } from "@pgrelay/client/react";
import { createSharedRelay } from "@pgrelay/client/tabs";
import { useRelayInvalidation } from "@pgrelay/client/tanstack-query";

// One connection per browser, shared by its tabs (createRelay from "@pgrelay/client": one per tab).
const relay = createSharedRelay({
  url: "wss://relay.example.com/v1",
  // Called before every connect, after a 4001 and ahead of expires_at.
  getToken: async () => {
    const r = await fetch("/api/relay-token", { credentials: "include" });
    if (r.status === 401) return null; // signed out: the client stops in "unauthorized"
    if (!r.ok) throw new Error(`relay token: HTTP ${r.status}`); // retried with backoff
    return ((await r.json()) as { token: string }).token;
  },
});

// What each signal makes stale; keys batched ~50 ms and deduped.
const routes = router({
  "job.*": (e) => ["jobs", e.org],
  "evidence.uploaded": (e) => [
    ["jobs", e.org],
    ["job", e.org, String(e.payload.job_id), "documents"],
  ],
  "audit.appended": (e) => ["audit", e.org], // refetched only if the audit page is open
});

interface Job {
  id: number;
  title: string;
  status: string;
}

function Jobs({ org }: { org: string }) {
  useRelayInvalidation(org, routes); // follows the org while mounted
  const jobs = useQuery({
    queryKey: ["jobs", org],
    queryFn: async () => (await fetch(`/api/orgs/${org}/jobs`)).json() as Promise<Job[]>,
  });
  return (
    <ul>
      {jobs.data?.map((job) => (
        <li key={job.id}>
          {job.title}: {job.status}
        </li>
      ))}
    </ul>
  );
}

function ConnectionBadge({ org }: { org: string }) {
  const s = useRelayStatus();
  const o = s.orgs[org];
  if (s.state === "reconnecting")
    return (
      <span>
        reconnecting (attempt {s.attempt}; {s.lastError})
      </span>
    );
  if (s.state === "unauthorized") return <a href="/login">sign in again</a>;
  return (
    <span>
      {s.state}
      {o?.state === "catching_up" && `, catching up (${o.replayed})`}
      {o?.lagMs != null && `, ${o.lagMs} ms behind`}
    </span>
  );
}

const org = "6f1c6f1c-0000-4000-8000-000000000001";
createRoot(document.getElementById("root")!).render(
  <RelayProvider relay={relay}>
    <QueryClientProvider client={new QueryClient()}>
      <ConnectionBadge org={org} />
      <Jobs org={org} />
      <button onClick={() => relay.signOut()}>Sign out</button>
    </QueryClientProvider>
  </RelayProvider>,
);
