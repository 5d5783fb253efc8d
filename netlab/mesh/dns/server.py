"""DNS over UDP and TCP (RFC 1035 §4.2; TCP with its two-byte length) for asyncio, answering with
a ``resolve(query, peer_ip)`` coroutine; and :func:`forward`, a query sent upstream over UDP.

Both of the lab's DNS servers run on it: ztunnel's proxy on ``127.0.0.1:15053`` inside each
enrolled pod (its sockets made in the pod and marked, :class:`netlab.mesh.sockets.PodSocketFactory`)
and the kube-dns stand-in on ``:53`` of its own pod.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from netlab.mesh.dns import codec
from netlab.mesh.sockets import MakeSocket

log = logging.getLogger("netlab.dns")

Resolve = Callable[[bytes, str], Awaitable[bytes | None]]
TCP_IDLE_S = 10.0
FORWARD_TIMEOUT_S = 2.0


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, resolve: Resolve, spawn: Callable[[Any], object]) -> None:
        self.resolve, self.spawn = resolve, spawn
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, peer: tuple[Any, ...]) -> None:
        self.spawn(self._answer(data, peer))

    async def _answer(self, data: bytes, peer: tuple[Any, ...]) -> None:
        try:
            out = await self.resolve(data, peer[0])
        except Exception:  # noqa: BLE001 - one bad query must not stop the server
            log.exception("dns: resolving a query from %s failed", peer[0])
            out = codec.error_for(data, codec.SERVFAIL)
        if out is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(out, peer)


class DnsServer:
    """UDP and TCP listeners on given sockets, each query answered by ``resolve``."""

    def __init__(self, resolve: Resolve) -> None:
        self.resolve = resolve
        self._transports: list[asyncio.BaseTransport] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def start(self, udp: socket.socket, tcp: socket.socket) -> DnsServer:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self.resolve, self._spawn), sock=udp)
        self._transports.append(transport)
        self._servers.append(await asyncio.start_server(self._tcp, sock=tcp))
        return self

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        try:
            while True:
                n = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S))[0]
                data = await asyncio.wait_for(reader.readexactly(n), TCP_IDLE_S)
                out = await self.resolve(data, peer[0])
                if out is None:
                    break
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for t in self._transports:
            t.close()
        for s in self._servers:
            s.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def forward(query: bytes, upstream: tuple[str, int], *, make: MakeSocket | None = None,
                  timeout: float = FORWARD_TIMEOUT_S) -> bytes | None:
    """Send ``query`` to ``upstream`` over UDP (from a socket ``make`` makes: in-pod, one in the
    pod's netns with the mark, so the pod's raw table puts it in conntrack zone 1) and return the
    answer with the same id, or None on timeout."""
    loop = asyncio.get_running_loop()
    s = (make or socket.socket)(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        await loop.sock_connect(s, upstream)
        await loop.sock_sendall(s, query)
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                data = await asyncio.wait_for(loop.sock_recv(s, 4096), left)
            except TimeoutError:
                return None
            except ConnectionRefusedError:
                return None
            if data[:2] == query[:2]:
                return data
    finally:
        s.close()
