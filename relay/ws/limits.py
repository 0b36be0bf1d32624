"""Every bound of the WebSocket shell: named constants with their unit, gathered
in one frozen `WsLimits` that the server and each connection share."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "ACCEPT_BACKLOG",
    "CLOSE_TIMEOUT_S",
    "DRAIN_LOW_WATER_BYTES",
    "HANDSHAKE_TIMEOUT_S",
    "MAX_HANDSHAKE_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_UNSENT_BYTES",
    "PING_INTERVAL_S",
    "PONG_TIMEOUT_S",
    "RECEIVE_CHUNK_BYTES",
    "SEND_BUFFER_BYTES",
    "WsLimits",
]

MAX_MESSAGE_BYTES = 4096
"""Largest client message (all fragments, UTF-8 bytes) before close 1009."""
MAX_UNSENT_BYTES = 64 * 1024
"""Most bytes a connection keeps unsent beyond what the kernel took."""
DRAIN_LOW_WATER_BYTES = 16 * 1024
"""The drain callback runs when a write leaves at most this many bytes pending."""
SEND_BUFFER_BYTES = 64 * 1024
"""SO_SNDBUF of accepted sockets (the kernel doubles it); 0 keeps the kernel's
autotuning, which silently buffers megabytes for a client that stopped reading."""
RECEIVE_CHUNK_BYTES = 4096
"""Bytes asked of one recv()."""
MAX_HANDSHAKE_BYTES = 8192
"""Largest HTTP upgrade request head; larger gets 431."""
HANDSHAKE_TIMEOUT_S = 5.0
"""A client that has not sent a full upgrade request by then is dropped."""
PING_INTERVAL_S = 20.0
"""Server ping period; math.inf turns the heartbeat off."""
PONG_TIMEOUT_S = 10.0
"""A ping unanswered this long closes the connection with 1011."""
CLOSE_TIMEOUT_S = 5.0
"""Bound on a graceful close: flushing, then reading until the peer's EOF."""
ACCEPT_BACKLOG = 4096
"""listen() backlog (the kernel caps it at net.core.somaxconn)."""
MAX_HANDSHAKES = 1000
"""Upgrade requests read at once; more connections wait in the listen backlog,
where they cost nothing and their handshake deadline has not started."""


@dataclass(frozen=True, slots=True)
class WsLimits:
    """Bounds of the server and of each of its connections."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Largest message accepted from a client; more closes with 1009."""
    max_unsent_bytes: int = MAX_UNSENT_BYTES
    """Most bytes queued for one client; a send that would exceed it is refused."""
    drain_low_water_bytes: int = DRAIN_LOW_WATER_BYTES
    """Pending level at or under which the drain callback runs."""
    send_buffer_bytes: int = SEND_BUFFER_BYTES
    """SO_SNDBUF for accepted sockets; 0 leaves the kernel default."""
    receive_chunk_bytes: int = RECEIVE_CHUNK_BYTES
    """Bytes asked of one recv()."""
    max_handshake_bytes: int = MAX_HANDSHAKE_BYTES
    """Largest upgrade request head."""
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    """Deadline for the whole upgrade request to arrive."""
    ping_interval_s: float = PING_INTERVAL_S
    """Server ping period (math.inf: no heartbeat)."""
    pong_timeout_s: float = PONG_TIMEOUT_S
    """Time a ping may stay unanswered."""
    close_timeout_s: float = CLOSE_TIMEOUT_S
    """Bound on a graceful close."""
    accept_backlog: int = ACCEPT_BACKLOG
    """listen() backlog."""
    max_handshakes: int = MAX_HANDSHAKES
    """Connections accepted and not yet through their upgrade request, at most."""

    def __post_init__(self) -> None:
        for name in (
            "max_message_bytes",
            "max_unsent_bytes",
            "receive_chunk_bytes",
            "max_handshake_bytes",
            "accept_backlog",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"WsLimits.{name} must be positive")
        if not 0 <= self.drain_low_water_bytes <= self.max_unsent_bytes:
            raise ValueError("WsLimits.drain_low_water_bytes must be in [0, max_unsent_bytes]")
        if self.send_buffer_bytes < 0:
            raise ValueError("WsLimits.send_buffer_bytes must not be negative")
        for name in ("handshake_timeout_s", "ping_interval_s", "pong_timeout_s", "close_timeout_s"):
            value = getattr(self, name)
            if math.isnan(value) or value <= 0:
                raise ValueError(f"WsLimits.{name} must be positive")
