/**
 * Every WebSocket close code this client knows, and what it does about it, in
 * one table (the README's "Close codes" table is the server's side of it).
 *
 * - `backoff`: reconnect after a full-jitter backoff (0.5 s ceiling, doubling to 30 s).
 * - `now`: reconnect at once, resume from the cursors. If the previous connection
 *   did not stay up for the stable period, back off instead (no tight loop).
 * - `restart`: the server is restarting: reconnect after a uniformly random
 *   0.5-5 s, so that a fleet of clients does not come back in one burst.
 * - `token`: reconnect only with a new token (a different one from getToken);
 *   the same token again, `null`, or an unauthorized error stop in `unauthorized`.
 * - `stop`: the client is broken; reconnecting would repeat it. Surface it
 *   (state `failed`), do not loop; `reconnect()` tries again by hand.
 */
export type CloseRule = readonly [
  then: "backoff" | "now" | "restart" | "token" | "stop",
  why: string,
];

export const CLOSE_CODES: Readonly<Record<number, CloseRule>> = {
  1003: ["stop", "binary frame"],
  1007: ["stop", "invalid UTF-8"],
  1009: ["stop", "frame too big"],
  1011: ["now", "no pong in time"],
  1012: ["restart", "server restarting"],
  1013: ["backoff", "too many connections"],
  4001: ["token", "token refused"],
  4002: ["stop", "no auth in time"],
  4008: ["now", "too slow"],
  4029: ["stop", "bad frames"],
};

/** The rule for a code; anything else (1000, 1001, 1006 when the network drops...) backs off. */
export const closeRule = (code: number): CloseRule =>
  CLOSE_CODES[code] ?? ["backoff", "connection lost"];

/** `restart`: the reconnect waits a uniformly random time in this window (ms). */
export const RESTART_WINDOW_MS = [500, 5_000] as const;
