"""Tell systemd how the daemon is doing: readiness, stopping, watchdog pets.

A dependency-free client of the sd_notify protocol (``man 3 sd_notify``): one
datagram of ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract socket when it starts with ``@``).
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon
calls it unconditionally.

The variables read here are systemd's protocol, not pgrelay settings, which is
why they are not in :mod:`relay.config`. They are read only by
:func:`notify_address` and :func:`watchdog_interval`, which take the
environment mapping as a parameter (tests pass a dict; nobody patches
``os.environ``).

Wiring in ``pgrelay serve``::

    daemon = Daemon(settings, notify=sdnotify.notify)       # READY=1, STOPPING=1
    ...after READY=1:
    nursery.start_soon(partial(sdnotify.watchdog_loop, alive=heartbeat_is_fresh))
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

import trio

#: Upper bound on one send: a notification must never wedge the trio thread
#: (systemd drains its socket quickly; when it does not, we give up and say so).
NOTIFY_SEND_TIMEOUT_S = 1.0
#: Pet the watchdog this many times per WATCHDOG_USEC period (sd_watchdog_enabled(3)
#: recommends half the period).
WATCHDOG_PETS_PER_PERIOD = 2


def notify_address(environ: Mapping[str, str]) -> str | bytes | None:
    """The socket address in ``$NOTIFY_SOCKET``, or None when unset or unusable.

    ``/path`` is a filesystem socket; ``@name`` is the Linux abstract socket
    ``\\0name``. Other forms (``vsock:``, relative paths) are not supported.
    """
    raw = environ.get("NOTIFY_SOCKET", "")
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + os.fsencode(raw[1:])
    return None


def notify(message: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd as one datagram.

    True when it was sent; False when there is no notification socket (not
    running under a ``Type=notify`` unit) or the send failed. Never raises.
    """
    address = notify_address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(NOTIFY_SEND_TIMEOUT_S)
            sock.connect(address)
            sock.send(message.encode())
    except OSError:
        return False
    return True


def watchdog_interval(environ: Mapping[str, str], *, pid: int | None = None) -> float | None:
    """Seconds between watchdog pets, or None when no watchdog is configured.

    Follows sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` must be a positive
    integer, and ``$WATCHDOG_PID``, when set, must be this process's pid (the
    variables may have leaked from a parent). Malformed values mean "no
    watchdog". The answer is half the period.
    """
    usec_text = environ.get("WATCHDOG_USEC", "")
    pid_text = environ.get("WATCHDOG_PID", "")
    try:
        usec = int(usec_text)
        if pid_text and int(pid_text) != (os.getpid() if pid is None else pid):
            return None
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / WATCHDOG_PETS_PER_PERIOD


async def watchdog_loop(
    interval_s: float | None = None,
    *,
    alive: Callable[[], bool] = lambda: True,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Send ``WATCHDOG=1`` every ``interval_s`` seconds for as long as ``alive()``.

    ``interval_s`` defaults to :func:`watchdog_interval` of the environment;
    returns at once when there is no watchdog or no notification socket.
    Otherwise runs until cancelled. While ``alive()`` is False the pets stop,
    so a daemon whose heartbeat is stale is restarted by systemd after
    ``WatchdogSec``; a heartbeat that recovers before then resumes them.
    """
    env = os.environ if environ is None else environ
    if interval_s is None:
        interval_s = watchdog_interval(env)
    if interval_s is None or notify_address(env) is None:
        return
    if not interval_s > 0:
        raise ValueError(f"watchdog interval must be > 0 seconds, not {interval_s}")
    while True:
        if alive():
            notify("WATCHDOG=1", environ=env)
        await trio.sleep(interval_s)
