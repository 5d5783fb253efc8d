"""TCP -> TCP relay on loopback (no root): byte counts, half-close, resets, back-pressure.

A TCP -> TCP relay runs "direct" (no Python per chunk; counts from the kernel's TCP_INFO), so
these tests check that the counts, the half-close and the reset propagation are exactly what
the per-chunk Python path gave, with the standard asyncio loop and with uvloop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket

import pytest

from netlab.mesh.relay import (
    OUTCOME_DOWNSTREAM_RESET,
    OUTCOME_OK,
    OUTCOME_UPSTREAM_RESET,
    RelayResult,
    TcpStream,
    relay,
    set_linger_zero,
    tcp_connect,
    tcp_stream_from_socket,
)

LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


def run(kind: str, coro) -> object:
    if kind == "uvloop":
        import uvloop
        return uvloop.run(coro)
    return asyncio.run(coro)


class Proxy:
    """Accepts on loopback, connects upstream, relays with :func:`relay`; keeps the results."""

    def __init__(self, upstream: tuple[str, int], pull_first: int = 0) -> None:
        self.upstream = upstream
        self.pull_first = pull_first
        self.results: list[RelayResult] = []
        self.pulled = b""
        self.direct_seen: list[bool] = []
        self.done = asyncio.Event()

    async def start(self) -> tuple[str, int]:
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen()
        self.lsock.setblocking(False)
        self.task = asyncio.ensure_future(self._serve())
        return self.lsock.getsockname()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        sock, _ = await loop.sock_accept(self.lsock)
        down = await tcp_stream_from_socket(sock)
        if self.pull_first:
            self.pulled = await down.readexactly(self.pull_first)
        up = await tcp_connect(self.upstream)
        watch = asyncio.ensure_future(self._watch_direct(down, up))
        self.results.append(await relay(down, up))
        watch.cancel()
        self.done.set()

    async def _watch_direct(self, *eps: TcpStream) -> None:
        await asyncio.sleep(0)
        self.direct_seen = ["data_received" in ep.protocol.__dict__ for ep in eps]

    def close(self) -> None:
        self.task.cancel()
        self.lsock.close()


async def _server(handler) -> tuple[asyncio.AbstractServer, tuple[str, int]]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()


async def _through_proxy(handler, send: bytes, pull_first: int = 0) -> tuple[Proxy, bytes]:
    """client -> Proxy -> server(``handler``): send ``send`` and a FIN, read the reply to its end."""
    srv, addr = await _server(handler)
    px = Proxy(addr, pull_first=pull_first)
    paddr = await px.start()
    r, w = await asyncio.open_connection(*paddr)
    w.write(send)
    await w.drain()
    w.write_eof()
    back = await asyncio.wait_for(r.read(), 20)
    w.close()
    await asyncio.wait_for(px.done.wait(), 20)
    px.close()
    srv.close()
    return px, back


@pytest.mark.parametrize("kind", LOOPS)
def test_counts_and_half_close_both_ways(kind: str) -> None:
    up_payload = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB client -> server
    down_payload = b"R" * 300_001

    async def main() -> None:
        got = {}

        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            got["up"] = await r.read()  # until the client's FIN, passed on by the relay
            w.write(down_payload)
            await w.drain()
            w.close()

        px, back = await _through_proxy(handler, up_payload)
        assert got["up"] == up_payload
        assert back == down_payload
        assert px.direct_seen == [True, True], "the TCP -> TCP relay did not run direct"
        assert px.results == [RelayResult(len(up_payload), len(down_payload), OUTCOME_OK)]

    run(kind, main())


@pytest.mark.parametrize("kind", LOOPS)
def test_bytes_pulled_before_the_relay_are_not_counted(kind: str) -> None:
    async def main() -> None:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = await r.read()
            w.write(b"ok:" + str(len(data)).encode())
            await w.drain()
            w.close()

        px, back = await _through_proxy(handler, b"H" * 10 + b"x" * 5000, pull_first=10)
        assert px.pulled == b"H" * 10
        assert back == b"ok:5000"
        assert px.results == [RelayResult(5000, 7, OUTCOME_OK)]

    run(kind, main())


@pytest.mark.parametrize("kind", LOOPS)
def test_upstream_reset_after_data_is_counted_and_passed_on(kind: str) -> None:
    async def main() -> None:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readexactly(3)
            w.write(b"D" * 777)
            await w.drain()
            await r.readexactly(3)  # the client got the 777 bytes and said so: now reset
            set_linger_zero(w.get_extra_info("socket"))
            w.transport.abort()

        srv, addr = await _server(handler)
        px = Proxy(addr)
        paddr = await px.start()
        r, w = await asyncio.open_connection(*paddr)
        w.write(b"go!")
        assert await asyncio.wait_for(r.readexactly(777), 10) == b"D" * 777
        w.write(b"ack")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 10)  # a reset, never a clean FIN
        await asyncio.wait_for(px.done.wait(), 10)
        px.close()
        srv.close()
        w.close()
        assert px.results == [RelayResult(6, 777, OUTCOME_UPSTREAM_RESET)]

    run(kind, main())


@pytest.mark.parametrize("kind", LOOPS)
def test_client_reset_resets_upstream_and_is_counted(kind: str) -> None:
    async def main() -> None:
        seen: dict[str, object] = {}

        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            seen["data"] = await r.readexactly(4000)
            w.write(b"y")
            try:
                seen["rest"] = await r.read()
            except ConnectionResetError:
                seen["rest"] = "reset"

        srv, addr = await _server(handler)
        px = Proxy(addr)
        paddr = await px.start()
        r, w = await asyncio.open_connection(*paddr)
        w.write(b"z" * 4000)
        assert await asyncio.wait_for(r.readexactly(1), 10) == b"y"
        set_linger_zero(w.get_extra_info("socket"))
        w.transport.abort()
        await asyncio.wait_for(px.done.wait(), 10)
        for _ in range(100):
            if "rest" in seen:
                break
            await asyncio.sleep(0.02)
        px.close()
        srv.close()
        assert seen == {"data": b"z" * 4000, "rest": "reset"}
        assert px.results == [RelayResult(4000, 1, OUTCOME_DOWNSTREAM_RESET)]

    run(kind, main())


@pytest.mark.parametrize("kind", LOOPS)
def test_slow_reader_pauses_the_fast_writer(kind: str) -> None:
    """Back-pressure still works direct: a 24 MiB push to a reader that starts late arrives whole."""
    total = 24 << 20

    async def main() -> None:
        got = {}

        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await asyncio.sleep(0.5)  # let the relay's write buffer fill up to its high mark
            n = 0
            while chunk := await r.read(1 << 16):
                n += len(chunk)
            got["n"] = n
            w.close()

        px, back = await _through_proxy(handler, b"b" * total)
        assert back == b""
        assert got["n"] == total
        assert px.results == [RelayResult(total, 0, OUTCOME_OK)]

    run(kind, main())


def test_out_of_fds_the_relay_runs_the_python_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fd for the dup (EMFILE): the relay does not fail, it forwards through Python, counts alike."""
    import errno
    import os

    from netlab.mesh import relay as relay_mod

    def no_fd(fd: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(relay_mod.os, "dup", no_fd)

    async def main() -> None:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = await r.read()
            w.write(data[::-1])
            await w.drain()
            w.close()

        px, back = await _through_proxy(handler, b"0123456789" * 1000)
        assert back == (b"0123456789" * 1000)[::-1]
        assert px.direct_seen == [False, False]
        assert px.results == [RelayResult(10000, 10000, OUTCOME_OK)]

    run("asyncio", main())
