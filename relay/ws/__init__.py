"""WebSocket server shell over wsproto, for trio.

Encode a server frame once (`encode_text_frame`), offer the same bytes to
every connection with `WsConnection.send_frame_nowait` (never awaits), read
client messages with `receive_message`. `WsServer` accepts, runs the
handshake (one path, an Origin allow-list, no extensions) and one handler per
connection. Limits live in `WsLimits`.
"""

from relay.core.codes import CloseCode
from relay.ws.connection import Handler, SendResult, WsConnection, WsState
from relay.ws.frames import encode_binary_frame, encode_close_frame, encode_text_frame
from relay.ws.handshake import OriginPolicy, WsReject, WsRequest
from relay.ws.limits import WsLimits
from relay.ws.server import RefusalHook, RequestHook, WsServer

__all__ = [
    "CloseCode",
    "Handler",
    "OriginPolicy",
    "RefusalHook",
    "RequestHook",
    "SendResult",
    "WsConnection",
    "WsLimits",
    "WsReject",
    "WsRequest",
    "WsServer",
    "WsState",
    "encode_binary_frame",
    "encode_close_frame",
    "encode_text_frame",
]
