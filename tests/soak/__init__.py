"""The project's own soak: a long-running, fault-injecting, end-to-end check.

Two `pgrelay serve` instances (A with the default 1 s tail timer, B polling
every 300 ms) on a PostgreSQL cluster of the soak's own; a few hundred
clients over 20 organizations (some on two), in two client processes; a
writer (tests/soak/writer.py) with single-row commits, 100-row transactions,
transactions that commit seconds late, rollbacks and repeated dedupe keys.
Faults, scheduled by a seeded RNG (tests/soak/plan.py): the listening
connections killed (pg_terminate_backend), `pg_ctl restart -m fast`, kill -9
of one instance and its restart on the same port, the doorbell trigger
switched off for a while (poll mode), clients that stop reading for longer
than PGRELAY_SLOW_CLIENT_TIMEOUT_S, clients away for a while that resume on
the other instance, and tokens that expire mid-run.

The oracle is the events table. After the writers stop, one fence row per
org is written, and the clients drain: each waits (bounded) until its last
cursor of each org makes every row of that org visible. Then, for each
(client, org):

- the baseline is the cursor of the client's first `subscribed` for that
  org, replaced by the cursor of each `resync` it received (a resync tells
  the client to refetch everything, which excuses what came before it);
- the obligation is every row of that org NOT visible in the baseline
  snapshot (`Snapshot.visible(xid)`);
- lost = rows in the obligation the client never received (on any
  connection);
- cross-org = an event in a frame for an org the client did not subscribe
  to (its token grants exactly the orgs it subscribes to), or whose id is a
  row of another org than the frame says;
- rolled-back delivered = a received id that is not in the table (rolled
  back transactions and repeated dedupe keys leave no row; retention does
  not run during a soak);
- repeats on one connection = the same id twice on one connection; repeats
  after a reconnect are allowed by the protocol and counted separately;
- resyncs are counted by reason, and separately those that reached a
  client that never stopped reading on that connection;
- latency p50/p99 = receive time minus the writer's clock just before the
  INSERT, over live single-commit events (not replays, not on connections
  where the client stopped reading), with the doorbell on; poll_p50/p99 the
  same while it was off;
- RSS and fds: the maximum over the run of each instance's process
  (/proc/PID/status VmRSS, /proc/PID/fd), across restarts.

Every entity_id is unique, so coalescing (which merges events with the same
key into one frame that stands for several ids) cannot happen; a
`coalesced` frame would be reported. Pass: zero lost, zero cross-org, zero
rolled-back delivered, and no harness error. Undrained clients count their
missing rows as lost: a client stuck after its catch-up is a failure.

Run it: `make soak` (SOAK_SECONDS=300 by default), or
`python -m tests.soak --seconds 300 [--clients N] [--seed S] [--json out.json]`;
tests/soak/test_soak.py runs a short version inside `make test`.
"""
