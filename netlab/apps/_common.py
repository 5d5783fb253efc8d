"""What every sample app shares: command line, the ready line, JSON logs, the event loop.

The supervisor (``netlab.runtime.supervisor``) knows an app is serving when a line that parses
as JSON with ``"event": "ready"`` appears on its stdout. Apps print it only after every
listening socket is bound, so "ready" really means "connect() will succeed". The line also
carries the bound ports, which lets tests ask for ``--port 0`` and learn the real port.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TextIO


def base_parser(prog: str, default_port: int, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--port", type=int, action="append", default=None,
                   help=f"TCP port to listen on; repeat for several (default {default_port}; 0 = any free port)")
    p.add_argument("--bind", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    p.add_argument("--name", default=None,
                   help="pod name reported by the app (default $POD_NAME, else $NETLAB_PROC, else the hostname)")
    p.add_argument("--log", default=None, help="append JSON log lines here instead of stdout")
    p.set_defaults(_default_port=default_port)
    return p


def ports_of(args: argparse.Namespace) -> list[int]:
    return list(args.port) if args.port else [args._default_port]


def pod_name(args: argparse.Namespace) -> str:
    # Every netns shares the host's UTS namespace, so the hostname would be the same for all
    # pods; the supervisor exports NETLAB_PROC so each instance still has its own identity.
    return args.name or os.environ.get("POD_NAME") or os.environ.get("NETLAB_PROC") or socket.gethostname()


class JsonLog:
    """One JSON object per line, flushed each time so `netlab logs -f` sees it immediately."""

    def __init__(self, path: str | None) -> None:
        self._f: TextIO = open(path, "a", buffering=1) if path else sys.stdout

    def emit(self, **fields: Any) -> None:
        rec = {"time": now_iso(), **fields}
        self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._f.flush()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def announce_ready(name: str, app: str, ports: list[int], **extra: Any) -> None:
    """Print the ready line on stdout (always stdout: that is what the supervisor watches)."""
    rec = {"event": "ready", "app": app, "name": name, "pid": os.getpid(), "ports": ports, **extra}
    sys.stdout.write(json.dumps(rec, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def peer_ip_port(peer: Any) -> tuple[str, int]:
    """(ip, port) of a peername, unmapping ``::ffff:a.b.c.d`` so IPv4 clients look like IPv4."""
    if not peer:
        return ("", 0)
    ip, port = peer[0], int(peer[1])
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return (ip, port)


async def listen(client_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                 bind: str, ports: list[int]) -> tuple[list[asyncio.base_events.Server], list[int]]:
    """Bind every port (backlog 4096: 1000 simultaneous connects must not overflow the queue)."""
    servers, bound = [], []
    for port in ports:
        srv = await asyncio.start_server(client_cb, host=bind, port=port, backlog=4096,
                                         reuse_address=True, limit=1 << 16)
        servers.append(srv)
        bound.append(srv.sockets[0].getsockname()[1])
    return servers, bound


async def serve_forever(servers: list[asyncio.base_events.Server]) -> None:
    await asyncio.gather(*(s.serve_forever() for s in servers))


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` on uvloop when installed (and not disabled by NETLAB_NO_UVLOOP=1)."""
    try:
        try:
            if os.environ.get("NETLAB_NO_UVLOOP") == "1":
                raise ImportError
            import uvloop  # type: ignore[import-not-found]
        except ImportError:
            asyncio.run(main())
        else:
            uvloop.run(main())
    except KeyboardInterrupt:  # Ctrl-C in a terminal: exit quietly, no traceback
        pass
