"""Per-connection objects of the HBONE datapath are freed when the connection closes (loopback, no root).

The load tests saw proxy RSS grow with every HBONE connection handled (sidecar 914 -> 1542 MiB,
waypoint 38 -> 612 MiB over ~7000 connections) while fd counts stayed flat and a forced
``gc.collect()`` found nothing left over. The cause: every connection's objects sat in
reference cycles (relay sink <-> producer, stream -> connection -> TLS transport, h2's
``H2Connection`` bound-method table, stored exceptions with tracebacks), so closing a connection
freed nothing; only a full cyclic-GC pass did, and a proxy holding many long-lived objects runs
one rarely. Meanwhile each dead connection pinned its TLS state (then uvloop's SSLProtocol with a
256 KiB read buffer; now the OpenSSL SSL object and BIOs, the frame reader) and ~350 h2 objects.

So these tests count live objects *with the cyclic GC switched off*: after N connections through a
waypoint-shaped chain (client -> HboneServer A, whose handler opens an HBONE client to
HboneServer B -> TCP upstream) the counts must be back at the baseline by reference counting
alone. The error paths (resets, statuses, failed TLS) are checked the same way. RSS is not
asserted (allocator-dependent); the kernel load tests print it.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import importlib.util
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from netlab.istio import spiffe_id
from netlab.mesh import hbone
from netlab.mesh.ca import LabCA
from netlab.mesh.relay import tcp_connect

A_IP, B_IP = "127.0.0.2", "127.0.0.3"
A_ID, B_ID = spiffe_id("wp", "waypoint"), spiffe_id("bar", "sink")
CLIENT_ID, DEFAULT_ID = spiffe_id("foo", "sleep"), spiffe_id("istio-system", "ztunnel")

# one of each exists per connection (or per stream / TLS side); any left over is a leak
PER_CONNECTION = (
    "HboneConnection", "HboneStream", "TcpStream", "_TcpProtocol", "H2Connection", "H2Stream", "FrameReader",
    "SSLObject", "MemoryBIO", "ConnectRequest", "RelayResult", "StreamReset",
)

# the proxies run on uvloop when it is installed (install_fast_loop)
LOOPS = (["uvloop"] if importlib.util.find_spec("uvloop") else []) + ["asyncio"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ca = LabCA.create(tmp_path_factory.mktemp("pki") / "lab")
    return {"ca": ca.ca_cert_path, "a": ca.issue(A_ID), "b": ca.issue(B_ID), "client": ca.issue(CLIENT_ID),
            "default": ca.issue(DEFAULT_ID)}


def run_on(loop_kind: str, coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    gc.enable()
    if loop_kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(), 120))
    finally:
        gc.enable()
        loop.run_until_complete(_close_all())
        loop.close()


_chains: list[Chain] = []


async def _close_all() -> None:
    while _chains:
        await _chains.pop().close()


def live_counts() -> Counter[str]:
    """Live per-connection objects, *without* collecting: what reference counting has not freed."""
    return Counter(n for o in gc.get_objects() if (n := type(o).__name__) in PER_CONNECTION)


class Chain:
    """client -> A (waypoint-like: terminates HBONE, originates HBONE) -> B -> TCP upstream."""

    def __init__(self, pki: dict[str, Any]) -> None:
        self.pki = pki
        self.results: list[Any] = []

    async def start(self) -> Chain:
        _chains.append(self)
        async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                port = w.get_extra_info("sockname")[1]
                if port == self.rst_port:  # some bytes, then a TCP RST
                    w.write(b"x" * 50_000)
                    await w.drain()
                    await asyncio.sleep(0.01)
                    w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    w.transport.abort()
                    return
                h = hashlib.sha256()
                while d := await r.read(1 << 16):
                    h.update(d)
                w.write(h.hexdigest().encode())
                await w.drain()
                w.close()
            except ConnectionError:
                w.transport.abort()

        self.up = await asyncio.start_server(upstream, "127.0.0.1", 0)
        self.up_addr = self.up.sockets[0].getsockname()
        self.rst_srv = await asyncio.start_server(upstream, "127.0.0.1", 0)
        self.rst_port = self.rst_srv.sockets[0].getsockname()[1]
        refused = socket.socket()
        refused.bind(("127.0.0.1", 0))
        self.refused_port = refused.getsockname()[1]
        refused.close()  # nothing listens here: connect is refused

        async def handle_b(req: hbone.ConnectRequest) -> Any:
            port = req.dest[1] if req.dest else 0
            if port == 404:
                return 404
            if port == 1:
                return await tcp_connect(("127.0.0.1", self.rst_port))
            if port == 2:
                return await tcp_connect(("127.0.0.1", self.refused_port))  # -> 503
            return await tcp_connect(self.up_addr)

        async def handle_a(req: hbone.ConnectRequest) -> Any:
            try:
                return await hbone.hbone_connect(
                    self.b.sockname, req.authority, client_cert=self.pki["a"][0], client_key=self.pki["a"][1],
                    ca=self.pki["ca"], expected_identity=B_ID, source=(A_IP, 0), timeout=5)
            except hbone.HboneError as e:
                return e.status or 503

        self.b = await hbone.HboneServer(handler=handle_b, cert_for=lambda ip: self.pki["b"],
                                         default_cert=self.pki["default"], ca=self.pki["ca"],
                                         check_authority=False).start(host=B_IP, port=0)
        self.a = await hbone.HboneServer(handler=handle_a, cert_for=lambda ip: self.pki["a"],
                                         default_cert=self.pki["default"], ca=self.pki["ca"], check_authority=False,
                                         on_relay_done=lambda req, res: self.results.append(res.outcome)
                                         ).start(host=A_IP, port=0)
        return self

    async def close(self) -> None:
        await self.a.close()
        await self.b.close()
        for s in (self.up, self.rst_srv):
            s.close()
            await s.wait_closed()

    async def connect(self, port: int = 9000, expected: str = A_ID) -> hbone.HboneStream:
        return await hbone.hbone_connect(
            self.a.sockname, f"10.0.0.9:{port}", client_cert=self.pki["client"][0],
            client_key=self.pki["client"][1], ca=self.pki["ca"], expected_identity=expected, timeout=5)

    # ---- one connection per scenario --------------------------------------------------------
    async def ok(self, payload: bytes = b"p" * 65536) -> None:
        s = await self.connect()
        s.write(payload)
        await s.drain()
        s.write_eof()
        got = await s.read_all()
        assert got.decode() == hashlib.sha256(payload).hexdigest()
        await s.wait_closed()
        s.close()

    # (try/except, not pytest.raises: its ExceptionInfo and our frame would form a cycle of the test's own)
    async def upstream_reset(self) -> None:
        s = await self.connect(1)
        try:
            await s.read_all()
        except ConnectionError:
            return
        raise AssertionError("upstream RST did not reach the client as a reset")

    async def client_abort(self) -> None:
        s = await self.connect()
        s.write(b"half a request")
        await s.drain()
        await asyncio.sleep(0)
        s.abort()

    async def status(self, port: int, want: int) -> None:
        try:
            await self.connect(port)
        except hbone.HboneError as e:
            assert e.status == want, e
            return
        raise AssertionError(f"expected {want}")

    async def wrong_identity(self) -> None:
        try:
            await self.connect(expected=spiffe_id("other", "other"))
        except hbone.HboneTlsError:
            return
        raise AssertionError("a server with the wrong identity was accepted")


async def settle(chain: Chain, want_results: int | None = None) -> None:
    """Let closes, RST_STREAMs and TLS shutdowns finish on both sides."""
    for _ in range(200):
        busy = chain.a._conns or chain.b._conns or chain.a._tasks or chain.b._tasks
        if not busy and (want_results is None or len(chain.results) >= want_results):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_per_connection_objects_freed_without_the_cyclic_gc(pki: dict[str, Any], loop_kind: str) -> None:
    n = 300 if loop_kind == "uvloop" else 150

    async def main() -> None:
        chain = await Chain(pki).start()
        await asyncio.gather(*(chain.ok() for _ in range(10)))  # warm: contexts, lazily made objects
        await settle(chain, 10)
        gc.collect()
        gc.disable()
        try:
            base = live_counts()
            sem = asyncio.Semaphore(25)

            async def one() -> None:
                async with sem:
                    await chain.ok()

            await asyncio.gather(*(one() for _ in range(n)))
            await settle(chain, 10 + n)
            left = live_counts() - base
            assert chain.results.count("ok") == 10 + n
            assert not left, f"after {n} connections, objects only the cyclic GC would free: {dict(left)}"
            assert not chain.a._conns and not chain.a._tasks and not chain.b._conns and not chain.b._tasks
        finally:
            gc.enable()

    run_on(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("scenario", ["upstream_reset", "client_abort", "status_404", "status_503", "wrong_identity"])
def test_error_paths_free_their_objects_too(pki: dict[str, Any], loop_kind: str, scenario: str) -> None:
    async def main() -> None:
        chain = await Chain(pki).start()
        fn = {
            "upstream_reset": chain.upstream_reset,
            "client_abort": chain.client_abort,
            "status_404": lambda: chain.status(404, 404),
            "status_503": lambda: chain.status(2, 503),
            "wrong_identity": chain.wrong_identity,
        }[scenario]
        await asyncio.gather(*(fn() for _ in range(3)), chain.ok())
        await settle(chain)
        gc.collect()
        gc.disable()
        try:
            base = live_counts()
            await asyncio.gather(*(fn() for _ in range(30)))
            await settle(chain)
            left = live_counts() - base
            assert not left, f"{scenario} x30 left objects only the cyclic GC would free: {dict(left)}"
        finally:
            gc.enable()
        gc.collect()
        assert not (live_counts() - base), f"{scenario}: objects leaked for good"

    run_on(loop_kind, main)


def test_many_connections_do_not_accumulate_even_with_gc(pki: dict[str, Any]) -> None:
    """The plain leak check (what an objgraph-style count after ``gc.collect()`` shows)."""

    async def main() -> None:
        chain = await Chain(pki).start()
        await chain.ok()
        await settle(chain, 1)
        gc.collect()
        base = live_counts()
        payload = os.urandom(200_000)
        for _ in range(3):
            await asyncio.gather(*(chain.ok(payload) for _ in range(40)))
        await settle(chain, 121)
        gc.collect()
        assert not (live_counts() - base)

    run_on(LOOPS[0], main)


def test_idle_heap_trim_runs_once_per_burst(pki: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Proxies (``install_fast_loop``) hand freed heap back once connections stop; not while idle."""
    from netlab.mesh import heaptrim

    calls: list[int] = []
    if not heaptrim.enable(0.05):
        pytest.skip("no glibc malloc_trim")
    monkeypatch.setattr(heaptrim, "_malloc_trim", lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(heaptrim, "_trim_loop", None)

    async def main() -> None:
        chain = await Chain(pki).start()
        await asyncio.sleep(0.2)
        assert calls == []  # nothing finished yet: nothing to give back
        await asyncio.gather(*(chain.ok() for _ in range(5)))
        await settle(chain, 5)
        await asyncio.sleep(0.3)
        assert calls == [0]  # the burst is over: one trim
        await asyncio.sleep(0.3)
        assert calls == [0]  # idle: no more

    try:
        run_on(LOOPS[0], main)
    finally:
        heaptrim._trim_interval = None
