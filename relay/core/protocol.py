"""Wire protocol v1: client messages in, server frames out (JSON text frames).

Codes (close, error, resync, unsubscribe reasons) live in `relay.core.codes`.
The size of a client frame is bounded once, by the WebSocket layer (1009), so
decoding never sees an oversized frame. Decoding never raises on a peer's
input: junk becomes a `BadMessage` value that carries the message's `ref` when
one could be read. Rules the design leaves open, decided here:

- `ref` must be a non-empty string of at most MAX_REF_CHARS characters;
  numbers are rejected ("ref must be a string"), so replies always echo a
  string. It is required on subscribe, unsubscribe and ping.
- Unknown extra fields are ignored, so a newer client can talk to an older
  server; unknown `type`s are rejected.
- `org` must be a hyphenated uuid (either case); frames echo it lower-case.
- `event_types`: null/absent means every type; otherwise a non-empty list of
  at most MAX_EVENT_TYPES globs. A glob is dotted segments of `[a-z0-9_]`, or
  `*`, which stands for one or more whole segments (`job.*` matches
  `job.updated` and `job.step.done`, `*` matches everything). Duplicates are
  dropped; a list containing `*` means "no filter".
- `coalesce_ms` is an integer in [0, MAX_COALESCE_MS]; 0 means off, like null.
- `cursor` is a string or null; its contents are judged by `plan_resume`.

Encoders return the UTF-8 bytes of one compact JSON object per frame. Strings
are escaped to ASCII (so a client's lone surrogate in a `ref` cannot make
encoding fail) and an event's payload is embedded verbatim from Postgres.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _q

from relay.core.codes import ErrorCode, ResyncReason, UnsubscribeReason

__all__ = [
    "MAX_COALESCE_MS",
    "MAX_EVENT_TYPES",
    "MAX_EVENT_TYPE_CHARS",
    "MAX_REF_CHARS",
    "MAX_TOKEN_CHARS",
    "Auth",
    "BadMessage",
    "ClientMessage",
    "EventRow",
    "Ping",
    "Subscribe",
    "Unsubscribe",
    "decode_client_message",
    "encode_error",
    "encode_event",
    "encode_pong",
    "encode_ready",
    "encode_resync",
    "encode_subscribed",
    "encode_unsubscribed",
    "is_valid_event_glob",
]

MAX_TOKEN_CHARS = 16 * 1024
"""Longest accepted JWT."""

MAX_REF_CHARS = 64
"""Longest accepted `ref`."""

MAX_EVENT_TYPES = 32
"""Most globs in one subscribe's `event_types`."""

MAX_EVENT_TYPE_CHARS = 128
"""Longest single glob in `event_types`."""

MAX_COALESCE_MS = 10_000
"""Largest accepted `coalesce_ms`."""


# -- client messages ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth:
    """`{"type":"auth"}`: first frame, or a later token refresh."""

    token: str
    """The JWT, unverified."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    """`{"type":"subscribe"}`: start (or restart) delivery for one org."""

    ref: str
    """Client-chosen id echoed in the reply."""
    org: uuid.UUID
    """The organization to follow."""
    cursor: str | None = None
    """Resume point from an earlier frame; None starts live."""
    event_types: tuple[str, ...] | None = None
    """Globs to filter on; None means every event type."""
    coalesce_ms: int | None = None
    """Coalescing window in milliseconds; None means off."""


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """`{"type":"unsubscribe"}`: stop delivery for one org."""

    ref: str
    """Client-chosen id echoed in the reply."""
    org: uuid.UUID
    """The organization to stop following."""


@dataclass(frozen=True, slots=True)
class Ping:
    """`{"type":"ping"}`: answered with `pong`."""

    ref: str
    """Client-chosen id echoed in the pong."""


@dataclass(frozen=True, slots=True)
class BadMessage:
    """A client frame that is not a valid v1 message (a value, not an error)."""

    ref: str | None
    """The message's `ref` when it could be read, for the error reply."""
    message: str
    """Human-readable reason, safe to send back to the client."""


ClientMessage = Auth | Subscribe | Unsubscribe | Ping

_SEGMENT = r"(?:\*|[a-z0-9_]+)"
_GLOB = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def is_valid_event_glob(glob: str) -> bool:
    """Whether `glob` is an accepted `event_types` entry."""
    return len(glob) <= MAX_EVENT_TYPE_CHARS and _GLOB.fullmatch(glob) is not None


class _Invalid(Exception):
    """Internal: a field failed validation (never escapes this module)."""


def _reject_constant(name: str) -> object:
    raise _Invalid(f"{name} is not valid JSON")


def decode_client_message(text: str) -> ClientMessage | BadMessage:
    """Decode one client text frame. Never raises on any `str`."""
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except _Invalid as exc:
        return BadMessage(None, str(exc))
    except (ValueError, RecursionError):
        return BadMessage(None, "frame is not valid JSON")
    if not isinstance(obj, dict):
        return BadMessage(None, "frame must be a JSON object")
    raw_ref = obj.get("ref")
    ref = raw_ref if isinstance(raw_ref, str) and 0 < len(raw_ref) <= MAX_REF_CHARS else None
    kind = obj.get("type")
    try:
        if kind == "auth":
            return Auth(_token(obj))
        if kind == "subscribe":
            return Subscribe(
                ref=_ref(obj),
                org=_org(obj),
                cursor=_cursor(obj),
                event_types=_event_types(obj),
                coalesce_ms=_coalesce_ms(obj),
            )
        if kind == "unsubscribe":
            return Unsubscribe(ref=_ref(obj), org=_org(obj))
        if kind == "ping":
            return Ping(ref=_ref(obj))
    except _Invalid as exc:
        return BadMessage(ref, str(exc))
    if not isinstance(kind, str):
        return BadMessage(ref, "type must be a string")
    return BadMessage(ref, "unknown message type")


def _token(obj: dict[str, object]) -> str:
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        raise _Invalid("token must be a non-empty string")
    if len(token) > MAX_TOKEN_CHARS:
        raise _Invalid("token too long")
    return token


def _ref(obj: dict[str, object]) -> str:
    ref = obj.get("ref")
    if not isinstance(ref, str) or not ref:
        raise _Invalid("ref must be a non-empty string")
    if len(ref) > MAX_REF_CHARS:
        raise _Invalid(f"ref longer than {MAX_REF_CHARS} characters")
    return ref


def _org(obj: dict[str, object]) -> uuid.UUID:
    org = obj.get("org")
    if not isinstance(org, str) or not _UUID.fullmatch(org):
        raise _Invalid("org must be a uuid string")
    return uuid.UUID(org)


def _cursor(obj: dict[str, object]) -> str | None:
    cursor = obj.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise _Invalid("cursor must be a string or null")
    return cursor


def _event_types(obj: dict[str, object]) -> tuple[str, ...] | None:
    globs = obj.get("event_types")
    if globs is None:
        return None
    if not isinstance(globs, list) or not globs:
        raise _Invalid("event_types must be a non-empty list or null")
    if len(globs) > MAX_EVENT_TYPES:
        raise _Invalid(f"event_types has more than {MAX_EVENT_TYPES} entries")
    for glob in globs:
        if not isinstance(glob, str) or not is_valid_event_glob(glob):
            raise _Invalid("event_types entries must be globs like job.* or job.updated")
    if "*" in globs:
        return None
    return tuple(dict.fromkeys(globs))


def _coalesce_ms(obj: dict[str, object]) -> int | None:
    value = obj.get("coalesce_ms")
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_COALESCE_MS:
        raise _Invalid(f"coalesce_ms must be an integer from 0 to {MAX_COALESCE_MS}")
    return value or None


# -- server frames -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of relay.events as the tail reads it."""

    id: int
    """`id` (identity; order within one batch)."""
    org: uuid.UUID
    """`organization_id`."""
    event_type: str
    """`event_type`, dotted lower-case words."""
    entity_type: str
    """`entity_type`."""
    entity_id: str
    """`entity_id`."""
    actor_id: str | None
    """`actor_id`, or None."""
    payload_json: str
    """`payload::text`: valid JSON from Postgres, embedded without re-parsing."""
    created_at: str
    """`created_at` in ISO 8601."""
    xid: int
    """The writing transaction (xid8); never sent to clients."""


def _frame(text: str) -> bytes:
    return text.encode("utf-8")


def encode_event(row: EventRow, cursor: str, coalesced: int = 1) -> bytes:
    """An `event` frame; `coalesced` is written only when it is not 1."""
    actor = "null" if row.actor_id is None else _q(row.actor_id)
    tail = "}" if coalesced == 1 else f',"coalesced":{int(coalesced)}}}'
    return _frame(
        f'{{"type":"event","org":"{row.org}","id":{int(row.id)},'
        f'"event_type":{_q(row.event_type)},"entity_type":{_q(row.entity_type)},'
        f'"entity_id":{_q(row.entity_id)},"actor_id":{actor},'
        f'"payload":{row.payload_json},"created_at":{_q(row.created_at)},'
        f'"cursor":{_q(cursor)}{tail}'
    )


def encode_ready(connection_id: str, expires_at: float) -> bytes:
    """A `ready` frame; `expires_at` is the token's exp in whole unix seconds."""
    return _frame(
        f'{{"type":"ready","connection_id":{_q(connection_id)},"expires_at":{int(expires_at)}}}'
    )


def encode_subscribed(ref: str, org: uuid.UUID, cursor: str, replayed: int) -> bytes:
    """A `subscribed` frame, sent after the `replayed` catch-up events."""
    return _frame(
        f'{{"type":"subscribed","ref":{_q(ref)},"org":"{org}",'
        f'"cursor":{_q(cursor)},"replayed":{int(replayed)}}}'
    )


def encode_resync(org: uuid.UUID, reason: ResyncReason, cursor: str) -> bytes:
    """A `resync` frame: the client refreshes fully; the subscription stays live."""
    return _frame(
        f'{{"type":"resync","org":"{org}","reason":"{ResyncReason(reason).value}",'
        f'"cursor":{_q(cursor)}}}'
    )


def encode_unsubscribed(ref: str, org: uuid.UUID, reason: UnsubscribeReason) -> bytes:
    """An `unsubscribed` frame."""
    return _frame(
        f'{{"type":"unsubscribed","ref":{_q(ref)},"org":"{org}",'
        f'"reason":"{UnsubscribeReason(reason).value}"}}'
    )


def encode_pong(ref: str) -> bytes:
    """A `pong` frame."""
    return _frame(f'{{"type":"pong","ref":{_q(ref)}}}')


def encode_error(ref: str | None, code: ErrorCode, message: str) -> bytes:
    """An `error` frame; `ref` is null when the request's ref is unknown."""
    ref_json = "null" if ref is None else _q(ref)
    return _frame(
        f'{{"type":"error","ref":{ref_json},"code":"{ErrorCode(code).value}",'
        f'"message":{_q(message)}}}'
    )
