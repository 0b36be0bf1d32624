"""Non-blocking stdlib sockets driven by trio's public low-level API.

The shell owns plain `socket.socket` objects in non-blocking mode and waits
with `trio.lowlevel.wait_readable` / `wait_writable`, exactly as trio's own
socket wrapper does internally. That gives the fan-out a synchronous
`sock.send()` (one syscall, never awaits) without reaching into trio's private
`SocketType._sock`. Whoever closes a socket that another task may be waiting
on calls `trio.lowlevel.notify_closing` first (`close_socket` does).
"""

from __future__ import annotations

import errno
import socket

import trio

__all__ = [
    "SEND_FLAGS",
    "bind_listener",
    "close_socket",
    "configure_accepted",
    "discard_until_eof",
    "recv_some",
    "send_all",
]

SEND_FLAGS: int = getattr(socket, "MSG_NOSIGNAL", 0)
"""No SIGPIPE on a reset peer: the send fails with EPIPE instead."""

ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept() errors that mean "out of resources, try again shortly"."""
ACCEPT_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
"""accept() errors that concern only the one connection being accepted."""


async def bind_listener(
    host: str, port: int, backlog: int, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A non-blocking listening TCP socket on the first address `host` resolves to.

    `reuse_port`: with SO_REUSEPORT, so that several processes of one user each
    listen on the same port and the kernel spreads new connections over them
    (`pgrelay serve --workers`). `listen=False`: bound only; such a socket holds
    the port against other users without ever receiving a connection."""
    infos = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def configure_accepted(sock: socket.socket, send_buffer_bytes: int) -> None:
    """Non-blocking, TCP_NODELAY, and a small SO_SNDBUF (0 keeps the kernel's)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of `data`, waiting for writability; OSError on a broken peer."""
    await trio.lowlevel.checkpoint()
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view, SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


def recv_now(sock: socket.socket, max_bytes: int) -> bytes | None:
    """What already arrived on `sock` (b"" at EOF), or None when nothing did.
    Readers try this before waiting on epoll: bytes that are already there (a
    request right after the accept, messages during a reconnect storm) cost no
    epoll registration. Raises OSError when the peer reset, and
    trio.ClosedResourceError when the socket was closed here."""
    if sock.fileno() == -1:
        raise trio.ClosedResourceError("the socket was closed")
    try:
        return sock.recv(max_bytes)
    except (BlockingIOError, InterruptedError):
        return None


async def recv_ready(sock: socket.socket, max_bytes: int) -> bytes:
    """The next bytes from `sock` (b"" at EOF), tried before waiting (`recv_now`);
    a checkpoint either way."""
    await trio.lowlevel.checkpoint_if_cancelled()
    data = recv_now(sock, max_bytes)
    if data is not None:
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data
    while data is None:
        await trio.lowlevel.wait_readable(sock)
        data = recv_now(sock, max_bytes)
    return data


async def recv_some(sock: socket.socket, max_bytes: int) -> bytes:
    """The next bytes from `sock`; b"" at EOF or when the peer reset."""
    try:
        return await recv_ready(sock, max_bytes)
    except OSError:
        return b""


async def discard_until_eof(sock: socket.socket, chunk_bytes: int) -> None:
    """Read and drop input until EOF, so that closing sends FIN and not RST.

    Closing a socket with unread input makes the kernel send a reset, which
    can make the peer discard what we sent last (the close frame). Callers
    bound this with a deadline.
    """
    while await recv_some(sock, chunk_bytes):
        pass


def close_socket(sock: socket.socket) -> None:
    """Wake any task waiting on `sock`, then close it; idempotent."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
        sock.close()
