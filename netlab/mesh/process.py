"""The skeleton of every proxy process (ztunnel, sidecar, waypoint): one ``main`` for all three.

A proxy is a command line, a ``start`` coroutine that binds its listeners and returns a
:class:`Proxy`, and nothing else; :func:`run_proxy` does the rest, the same way for each:

1. parse the command line (the proxy's own options, plus ``--log-level``);
2. :func:`netlab.child_setup.setup`: the fd limit (two sockets per proxied connection, and a
   dup of each while a TCP relay runs) and dying with the supervisor;
3. logging to stderr, each line naming the process;
4. uvloop for the event loop and the idle heap trim (:func:`install_fast_loop`);
5. ``start``, then SIGTERM/SIGINT handlers, then the ready line on stdout (only once every
   listener is bound: the supervisor's readiness contract);
6. serve until a signal comes, then ``close``.

:func:`serve_readiness` is the readiness listener (:15021) every proxy has.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from netlab import child_setup, istio
from netlab.mesh import heaptrim
from netlab.mesh.bootstrap import MeshContext

log = logging.getLogger(__name__)

READY_PATH = "/healthz/ready"
LOG_LEVEL_ENV = "NETLAB_LOG_LEVEL"


class Proxy(Protocol):
    """A running proxy: what its ready line says, and how it stops."""

    @property
    def ready_fields(self) -> dict[str, Any]:
        """The ready line's fields: ``app`` (ztunnel/sidecar/waypoint), ``name``, and the proxy's own."""
        ...

    async def close(self) -> None: ...


def install_fast_loop() -> bool:
    """Proxy-process setup: uvloop for new event loops if it is installed (returns whether it
    is), and the idle heap trim (:mod:`netlab.mesh.heaptrim`)."""
    heaptrim.enable()
    return child_setup.use_uvloop()


def setup_logging(name: str, level: str) -> None:
    """Log lines on stderr (what the supervisor keeps as the process's log), naming the process."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")


async def serve_until_signalled(start: Callable[[], Awaitable[Proxy]]) -> None:
    """Start the proxy, say ready, serve until SIGTERM/SIGINT, close it."""
    proxy = await start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fields = dict(proxy.ready_fields)
    child_setup.announce_ready(fields.pop("app"), fields.pop("name"), **fields)
    await stop.wait()
    await proxy.close()


def run_proxy(argv: list[str] | None, *, prog: str, description: str,
              add_arguments: Callable[[argparse.ArgumentParser], None],
              start: Callable[[argparse.Namespace, argparse.ArgumentParser], Awaitable[Proxy]],
              log_name: Callable[[argparse.Namespace], str], default_log_level: str = "INFO") -> int:
    """A proxy's ``main`` (see the module docstring). ``start(args, parser)`` may call
    ``parser.error`` for arguments that only the lab's state can check (exit 2)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(p)
    p.add_argument("--log-level", default=None,
                   help=f"DEBUG, INFO, WARNING, ... (default ${LOG_LEVEL_ENV}, else {default_log_level})")
    args = p.parse_args(argv)
    child_setup.setup()
    setup_logging(log_name(args), args.log_level or os.environ.get(LOG_LEVEL_ENV) or default_log_level)
    install_fast_loop()
    asyncio.run(serve_until_signalled(lambda: start(args, p)))
    return 0


def run_pod_proxy(argv: list[str] | None, *, kind: str, description: str,
                  start: Callable[[MeshContext, str], Awaitable[Proxy]]) -> int:
    """:func:`run_proxy` for the proxy of one pod (sidecar, waypoint): ``--lab LAB --pod NS/NAME``,
    and ``start(the lab's context, "NS/NAME")``."""

    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--lab", required=True)
        p.add_argument("--pod", required=True, help="<namespace>/<name>")

    async def start_pod(args: argparse.Namespace, _p: argparse.ArgumentParser) -> Proxy:
        return await start(MeshContext.for_lab(args.lab), args.pod)

    return run_proxy(argv, prog=f"netlab.mesh.{kind}", description=description, add_arguments=arguments,
                     start=start_pod, log_name=lambda a: f"{kind}[{a.pod}]")


_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


async def serve_readiness(host: str = "0.0.0.0", port: int = istio.READINESS_PORT,
                          is_ready: Callable[[], bool] = lambda: True) -> asyncio.AbstractServer:
    """``/healthz/ready`` on 15021 (ztunnel ``readiness.rs``, pilot-agent's for Envoy; excluded
    from capture by ``-d 15090,15021,15020``): 200 when ready, 503 otherwise, 404 for other
    paths; one request per connection, HTTP/1.1. The proxies bind it last, so once it answers
    every listener is up. Good enough for curl and for probes; nothing else talks to it.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].decode("latin-1") if len(parts) > 1 else ""
            if path.split("?", 1)[0] == READY_PATH:
                status, body = (200, b"ready\n") if is_ready() else (503, b"not ready\n")
            else:
                status, body = 404, b"not found\n"
            writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: text/plain\r\n"
                         f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
