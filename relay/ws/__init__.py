"""WebSocket server shell over wsproto, for trio (and the plain HTTP requests
and event streams the same port answers: `relay.ws.http`).

Encode a server frame once (`encode_text_frame`), offer the same bytes to
every connection with `WsConnection.send_frame_nowait` (never awaits), read
client messages with `receive_message`. `WsServer` accepts, runs the
handshake (one path, an Origin allow-list, no extensions) and one handler per
connection. Limits live in `WsLimits`.
"""

from relay.core.codes import CloseCode
from relay.ws.connection import Handler, WsConnection, WsState
from relay.ws.frames import encode_binary_frame, encode_close_frame, encode_text_frame
from relay.ws.handshake import OriginPolicy, WsReject, WsRequest
from relay.ws.http import HttpExchange, HttpHandler, HttpRequest
from relay.ws.limits import WsLimits
from relay.ws.proxy import TrustedProxies
from relay.ws.server import RefusalHook, RequestHook, WsServer
from relay.ws.writer import SendResult, SocketWriter

__all__ = [
    "CloseCode",
    "Handler",
    "HttpExchange",
    "HttpHandler",
    "HttpRequest",
    "OriginPolicy",
    "RefusalHook",
    "RequestHook",
    "SendResult",
    "SocketWriter",
    "TrustedProxies",
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
