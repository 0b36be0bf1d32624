/**
 * Protocol v1 frames (JSON text frames), as DESIGN.md and the README define them.
 * Client frames go out with `JSON.stringify`; server frames come in through
 * `parseServerFrame`, which never throws: junk becomes `null`.
 */

/** `{"type":"auth"}`: the first frame on every socket, and later a token refresh. */
export interface AuthFrame {
  type: "auth";
  token: string;
}
/** `{"type":"subscribe"}`; `cursor` null starts fresh (live only). */
export interface SubscribeFrame {
  type: "subscribe";
  ref: string;
  org: string;
  cursor: string | null;
  event_types?: string[];
  coalesce_ms?: number;
}
export interface UnsubscribeFrame {
  type: "unsubscribe";
  ref: string;
  org: string;
}
export interface PingFrame {
  type: "ping";
  ref: string;
}
export type ClientFrame = AuthFrame | SubscribeFrame | UnsubscribeFrame | PingFrame;

/** Answer to `auth`: `expires_at` is the token's `exp` in unix seconds. */
export interface ReadyFrame {
  type: "ready";
  connection_id: string;
  expires_at: number;
}
/** One row of `relay.events`. `cursor` is where to resume after it. */
export interface EventFrame {
  type: "event";
  org: string;
  id: number;
  event_type: string;
  entity_type: string;
  entity_id: string;
  actor_id: string | null;
  payload: Record<string, unknown>;
  /** ISO 8601; the writing transaction's start. */
  created_at: string;
  cursor: string;
  /** With `coalesce_ms`: how many events this one stands for (absent means 1). */
  coalesced?: number;
}
/** After the `replayed` catch-up events of a subscribe, before live ones. */
export interface SubscribedFrame {
  type: "subscribed";
  ref: string;
  org: string;
  cursor: string;
  replayed: number;
}
export type ResyncReason =
  "cursor_expired" | "too_far_behind" | "overflow" | "epoch_changed" | "bad_cursor";
/** "Refetch everything of this org"; the subscription stays live from `cursor`. */
export interface ResyncFrame {
  type: "resync";
  org: string;
  reason: ResyncReason;
  cursor: string;
}
export interface UnsubscribedFrame {
  type: "unsubscribed";
  ref: string;
  org: string;
  reason: "requested" | "forbidden";
}
export interface PongFrame {
  type: "pong";
  ref: string;
}
export type ErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "too_many_subscriptions"
  | "rate_limited"
  | "internal";
export interface ErrorFrame {
  type: "error";
  ref: string | null;
  code: ErrorCode;
  message: string;
}
export type ServerFrame =
  | ReadyFrame
  | EventFrame
  | SubscribedFrame
  | ResyncFrame
  | UnsubscribedFrame
  | PongFrame
  | ErrorFrame;
/** The frames that belong to one organization's subscription. */
export type OrgFrame = EventFrame | SubscribedFrame | ResyncFrame | UnsubscribedFrame;

/** The fields this client relies on, per frame type; `id` and `expires_at` are numbers. */
const REQUIRED: Record<ServerFrame["type"], string[]> = {
  ready: ["expires_at"],
  event: ["org", "id", "cursor"],
  subscribed: ["org", "cursor"],
  resync: ["org", "cursor"],
  unsubscribed: ["org"],
  pong: [],
  error: ["code"],
};

/** One server text frame, or null when it is not a v1 frame this client knows. */
export function parseServerFrame(text: unknown): ServerFrame | null {
  try {
    const f = JSON.parse(text as string) as Record<string, unknown>;
    const need = REQUIRED[f.type as ServerFrame["type"]];
    return need?.every((k) => typeof f[k] == (k == "id" || k == "expires_at" ? "number" : "string"))
      ? (f as unknown as ServerFrame)
      : null;
  } catch {
    return null; // not JSON, or JSON null
  }
}
