"""What every sample app shares: command line, JSON logs, binding and serving (:func:`serve`).

The supervisor (``netlab.runtime.supervisor``) knows an app is serving when its ready line
(:func:`netlab.child_setup.announce_ready`, as the proxies print it) appears on its stdout. Apps
print it only after every listening socket is bound, so "ready" really means "connect() will
succeed". The line also carries the bound ports, which lets tests ask for ``--port 0`` and learn
the real port.
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

from netlab import child_setup


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
        self._f: TextIO = open(path, "a", buffering=1) if path else sys.stdout  # noqa: SIM115 - the app's lifetime

    def emit(self, **fields: Any) -> None:
        rec = {"time": now_iso(), **fields}
        self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._f.flush()


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    servers: list[asyncio.base_events.Server] = []
    bound: list[int] = []
    for port in ports:
        srv = await asyncio.start_server(client_cb, host=bind, port=port, backlog=4096,
                                         reuse_address=True, limit=1 << 16)
        servers.append(srv)
        bound.append(srv.sockets[0].getsockname()[1])
    return servers, bound


def serve(args: argparse.Namespace, app: str, name: str,
          client_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], **extra: Any) -> None:
    """An app's life after its set-up: bind every ``--port``, say ready (with the bound ports),
    serve until killed, on uvloop when it is installed (:mod:`netlab.child_setup`)."""

    async def amain() -> None:
        servers, ports = await listen(client_cb, args.bind, ports_of(args))
        child_setup.announce_ready(app, name, ports=ports, **extra)
        await asyncio.gather(*(s.serve_forever() for s in servers))

    child_setup.run(amain)
