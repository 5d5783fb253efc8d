"""What the Envoy-shaped proxies of the lab (sidecar, waypoint) share.

Kept apart from ztunnel on purpose: Envoy and ztunnel differ in small ways the lab wants to
show (SAN matching by trust-domain prefix, the 127.0.0.6 inbound bind, the 2 s HBONE connect
timeout), so these helpers encode Envoy's choices only. The waypoint imports them too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from netlab import istio, state
from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.connlog import ConnLog, Leg, addr
from netlab.mesh.hbone import ConnectRequest
from netlab.mesh.registry import Workload
from netlab.mesh.relay import RelayResult, TcpStream, accept_backlog, tcp_stream_from_socket
from netlab.mesh.sockets import original_dst

log = logging.getLogger(__name__)

READY_PATH = "/healthz/ready"


class TrustDomainSans(Sequence[str]):
    """Server-SAN matcher for ``hbone_connect(expected_identity=...)``: any SPIFFE ID in the trust domain.

    Envoy's ``connect_originate`` cluster matches the upstream SAN on the prefix
    ``spiffe://<td>/`` (§5.2), not one exact identity. ``hbone_connect`` checks
    ``identity in expected`` *during* the TLS setup, before any CONNECT is sent, so a container
    whose ``__contains__`` is a prefix test reproduces Envoy's check at the right moment (a
    wrong-domain server fails like a TLS error, never sees a request).
    """

    def __init__(self, trust_domain: str = istio.TRUST_DOMAIN) -> None:
        self.prefix = f"spiffe://{trust_domain}/"

    def __contains__(self, identity: object) -> bool:
        return isinstance(identity, str) and identity.startswith(self.prefix) and len(identity) > len(self.prefix)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        if i != 0:
            raise IndexError(i)
        return self.prefix + "*"

    def __iter__(self) -> Iterator[str]:
        yield self.prefix + "*"

    def __repr__(self) -> str:
        return f"TrustDomainSans({self.prefix}*)"


def find_workload(ctx: MeshContext, ref: str) -> Workload:
    """The registry entry of ``<ns>/<pod>``; the registry is keyed by IP."""
    ns, _, name = ref.partition("/")
    for w in ctx.registry.workloads.values():
        if w.namespace == ns and w.name == name:
            return w
    raise SystemExit(f"pod {ref!r} is not in the lab registry {ctx.state_dir}")


def pod_labels(state_dir: Path, ref: str) -> dict[str, str]:
    """Labels of a pod from the applied plan (the registry does not carry them).

    Needed for the ``version`` label of the sidecar's ``baggage`` and a waypoint's
    ``istio.io/for-service-account`` scope. Missing/unreadable plan -> no labels (defaults apply).
    """
    try:
        d = json.loads((state_dir / state.PLAN).read_text())
    except (OSError, ValueError):
        return {}
    for p in d.get("pods", ()):
        if f"{p.get('namespace')}/{p.get('name')}" == ref:
            return {k: v for k, v in p.get("labels", ())}
    return {}


def announce_ready(**extra: Any) -> None:
    """The supervisor's readiness contract: one JSON line on stdout, flushed."""
    sys.stdout.write(json.dumps({"event": "ready", "pid": os.getpid(), **extra}) + "\n")
    sys.stdout.flush()


def setup_logging(name: str) -> None:
    logging.basicConfig(level=os.environ.get("NETLAB_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")


async def serve_readiness(host: str = "0.0.0.0", port: int = istio.READINESS_PORT,
                          is_ready: Callable[[], bool] = lambda: True) -> asyncio.AbstractServer:
    """pilot-agent's ``/healthz/ready`` on 15021 (excluded from capture by ``-d 15090,15021,15020``).

    Minimal HTTP/1.1: 200 when ready, 503 otherwise, 404 for other paths; one request per
    connection. Good enough for curl and for probes; nothing else talks to it.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].decode("latin-1") if len(parts) > 1 else ""
            if path.split("?", 1)[0] == READY_PATH:
                status, body = (200, b"") if is_ready() else (503, b"not ready\n")
            else:
                status, body = 404, b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
                         .encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)


async def accept_loop(lsock: socket.socket, on_conn: Callable[[socket.socket], Awaitable[None]],
                      tasks: set[asyncio.Task[Any]]) -> None:
    """Accept forever, one task per connection (kept in ``tasks`` so they are not collected)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            sock, _ = await loop.sock_accept(lsock)
        except (ConnectionAbortedError, ConnectionResetError):
            continue
        except OSError as e:
            log.warning("accept failed: %s", e)
            await asyncio.sleep(0.05)
            continue
        for s in [sock, *accept_backlog(lsock)]:  # the whole backlog, not one per loop iteration
            t = loop.create_task(on_conn(s))
            tasks.add(t)
            t.add_done_callback(tasks.discard)


ORPHAN_GRACE_S = 1.0


async def open_redirected(sock: socket.socket, orig: tuple[str, int], component: str, listener: str,
                          conn_log: ConnLog, **identities: str) -> tuple[Leg, TcpStream | None]:
    """The leg of a connection a REDIRECT listener accepted, and its stream. The stream is None
    (the socket closed, the leg logged as an error) when the socket was gone before we got it."""
    leg = Leg(component=component, listener=listener, src=addr(sock.getpeername()), orig_dst=addr(orig),
              local=addr(sock.getsockname()), **identities)
    try:
        return leg, await tcp_stream_from_socket(sock)
    except OSError as e:
        sock.close()
        conn_log.write(leg.finish(f"error:{e}"))
        return leg, None


def finish_parked_leg(legs: dict[object, Leg], conn_log: ConnLog, req: ConnectRequest, res: RelayResult) -> None:
    """``HboneServer.on_relay_done``: log the leg the handler parked for this stream."""
    leg = legs.pop(req.stream, None)
    if leg is None:
        return
    leg.bytes_up, leg.bytes_down = res.bytes_up, res.bytes_down
    if res.outcome != "ok":
        leg.extra["reset"] = res.outcome
    conn_log.write(leg.finish("ok" if res.outcome == "ok" else "reset"))


class RedirectListener:
    """A sidecar listener fed by istio-iptables REDIRECT: read the original destination off the
    conntrack entry (SO_ORIGINAL_DST), then hand the socket to ``serve``."""

    listener = ""

    async def on_accept(self, sock: socket.socket) -> None:
        try:
            orig = original_dst(sock)
        except OSError as e:  # the socket already died
            log.info("%s: no original destination: %s", self.listener, e)
            sock.close()
            return
        await self.serve(sock, orig)

    async def serve(self, sock: socket.socket, orig: tuple[str, int]) -> None:
        raise NotImplementedError


def watch_orphan(req: ConnectRequest, legs: dict[object, Leg], conn_log: ConnLog) -> None:
    """Still log a leg whose relay never ran.

    ``HboneServer`` calls ``on_relay_done`` only for relayed streams; if the client gave up while
    the handler was connecting upstream, it aborts the upstream and says nothing. The leg the
    handler parked in ``legs`` is then written as ``downstream_gone`` shortly after the stream
    ended (a relayed stream's leg has been popped by then).
    """
    stream = req.stream
    if stream is None:
        return

    def flush() -> None:
        leg = legs.pop(stream, None)
        if leg is not None:
            conn_log.write(leg.finish("downstream_gone"))

    loop = asyncio.get_running_loop()
    stream.done.add_done_callback(lambda _f: loop.call_later(ORPHAN_GRACE_S, flush))
