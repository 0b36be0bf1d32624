/**
 * Type tests of the protocol frames: compiled by `tsc` (make lint, and the
 * "type tests" unit test). Each `@ts-expect-error` must be an error, or the
 * compile fails: the types reject what the protocol rejects.
 */
import type {
  ClientFrame,
  EventFrame,
  ServerFrame,
  SubscribeFrame,
  Status,
  ConnectionState,
  OrgState,
} from "../../src/index.js";

export function narrowing(f: ServerFrame): string {
  switch (f.type) {
    case "event":
      return f.cursor + f.id.toFixed() + f.event_type + (f.coalesced ?? 1);
    case "subscribed":
      return f.cursor + f.replayed;
    case "resync":
      return f.reason satisfies
        "cursor_expired" | "too_far_behind" | "overflow" | "epoch_changed" | "bad_cursor";
    case "ready":
      return String(f.expires_at * 1000);
    case "error":
      return f.code + (f.ref ?? "");
    case "pong":
      // @ts-expect-error a pong has no cursor
      return f.cursor;
    default:
      return f.type;
  }
}

export const fresh: SubscribeFrame = { type: "subscribe", ref: "1", org: "o", cursor: null };
export const filtered: ClientFrame = {
  type: "subscribe",
  ref: "1",
  org: "o",
  cursor: "c",
  event_types: ["job.*"],
  coalesce_ms: 250,
};
// prettier-ignore
// @ts-expect-error subscribe needs a ref
export const noRef: ClientFrame = { type: "subscribe", org: "o", cursor: null };
// prettier-ignore
// @ts-expect-error cursor is a string or null, never a number
export const numericCursor: SubscribeFrame = { type: "subscribe", ref: "1", org: "o", cursor: 5 };
export const tokenInSubscribe: ClientFrame = {
  type: "subscribe",
  ref: "1",
  org: "o",
  cursor: null,
  // @ts-expect-error the token travels in an auth frame only
  token: "t",
};
// @ts-expect-error not a client frame
export const serverOnly: ClientFrame = { type: "pong", ref: "1" };
// @ts-expect-error ids are numbers
export const badId: Pick<EventFrame, "id"> = { id: "12" };
// prettier-ignore
// @ts-expect-error an unknown resync reason
export const badReason: ServerFrame = { type: "resync", org: "o", reason: "whatever", cursor: "c" };

export const states: ConnectionState[] = [
  "idle",
  "connecting",
  "connected",
  "reconnecting",
  "paused",
  "offline",
  "unauthorized",
  "failed",
];
// @ts-expect-error no such state
export const notAState: ConnectionState = "open";
export const orgStates: OrgState[] = [
  "pending",
  "catching_up",
  "live",
  "resync",
  "forbidden",
  "error",
];
export function lag(s: Status): number | null {
  return s.orgs["o"]?.lagMs ?? null;
}
