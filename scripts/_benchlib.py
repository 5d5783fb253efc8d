#!/usr/bin/env python3
"""Server and client programs for scripts/bench-datapath, each run inside a pod netns
(``ip netns exec <netns> python scripts/_benchlib.py ...``), so every socket lives there.

    serve --discard-port P --echo-port Q   discard: read to EOF into one buffer (C-level
                                           recv_into loop), then answer "<bytes>\\n" and close;
                                           echo: write every byte back (uvloop Protocol, no
                                           StreamReader), close on EOF. Prints a JSON ready line.
    bulk  --dst IP:P --size BYTES          one TCP stream of BYTES from one preallocated 1 MiB
                                           buffer, then shutdown(SHUT_WR) and wait for the byte
                                           count; JSON: seconds, gbps (bytes counted by the server).
    rate  --dst IP:Q --conns N --seconds S --msg BYTES
                                           N keep-alive connections, each with one request in
                                           flight: write BYTES, wait for BYTES echoed back,
                                           repeat. Connections are opened and warmed up before
                                           the measured window. JSON: requests, rps, p50/p99 ms.

The servers are deliberately lean (discard + tiny echo) so the proxies' cost, not the apps',
dominates the difference between paths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import threading
import time

CHUNK = 1 << 20


def _fast_loop() -> None:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 65536 and (hard == resource.RLIM_INFINITY or hard > soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, hard) if hard != resource.RLIM_INFINITY else 65536, hard))


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# ------------------------------------------------------------------------------------- servers
def _discard_conn(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    got = 0
    try:
        while n := conn.recv_into(buf):
            got += n
        conn.sendall(f"{got}\n".encode())
    except OSError:
        pass
    finally:
        conn.close()


def _discard_server(port: int) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(128)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_discard_conn, args=(conn,), daemon=True).start()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.t.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False  # close our side too


def serve(a: argparse.Namespace) -> None:
    _nofile()
    _fast_loop()
    threading.Thread(target=_discard_server, args=(a.discard_port,), daemon=True).start()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(_Echo, "0.0.0.0", a.echo_port, backlog=4096, reuse_address=True)
        time.sleep(0.05)  # the discard thread binds first (tiny race otherwise)
        print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# ------------------------------------------------------------------------------------- clients
def bulk(a: argparse.Namespace) -> dict:
    dst = _addr(a.dst)
    block = memoryview(b"\xa5" * CHUNK)
    s = socket.create_connection(dst, timeout=a.timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    left = a.size
    while left > 0:
        n = min(left, CHUNK)
        s.sendall(block if n == CHUNK else block[:n])
        left -= n
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while d := s.recv(64):
        reply += d
    dt = time.perf_counter() - t0
    s.close()
    got = int(reply.strip() or -1)
    return {"bytes": a.size, "received": got, "ok": got == a.size, "seconds": dt, "gbps": a.size * 8 / dt / 1e9}


class _Stats:
    def __init__(self, msg: bytes) -> None:
        self.msg = msg
        self.phase = 0  # 0 warm-up, 1 measuring, 2 stopping
        self.lat: list[float] = []
        self.errors = 0


class _Client(asyncio.Protocol):
    def __init__(self, st: _Stats) -> None:
        self.st = st
        self.got = 0
        self.t0 = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self) -> None:
        self.t0 = time.perf_counter()
        self.t.write(self.st.msg)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        m = len(self.st.msg)
        if self.got < m:
            return
        self.got -= m
        now = time.perf_counter()
        st = self.st
        if st.phase == 1:
            st.lat.append(now - self.t0)
        if st.phase < 2:
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.st.phase < 2:
            self.st.errors += 1


async def _rate(a: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    dst = _addr(a.dst)
    st = _Stats(b"\x5a" * a.msg)
    conns: list[_Client] = []
    for i in range(0, a.conns, 25):  # open in small batches (each may cost an mTLS handshake)
        got = await asyncio.gather(*(loop.create_connection(lambda: _Client(st), *dst) for _ in range(min(25, a.conns - i))))
        conns += [p for _, p in got]
    for c in conns:
        c.send()
    await asyncio.sleep(a.warmup)
    st.phase = 1
    t0 = time.perf_counter()
    await asyncio.sleep(a.seconds)
    st.phase = 2
    dt = time.perf_counter() - t0
    await asyncio.sleep(0.2)
    for c in conns:
        c.t.close()
    lat = sorted(st.lat)
    n = len(lat)

    def q(p: float) -> float:
        return lat[min(n - 1, int(p * n))] * 1000 if n else float("nan")

    return {"conns": a.conns, "msg": a.msg, "requests": n, "seconds": dt, "rps": n / dt, "p50_ms": q(0.50),
            "p99_ms": q(0.99), "errors": st.errors}


def rate(a: argparse.Namespace) -> dict:
    _nofile()
    _fast_loop()
    return asyncio.run(_rate(a))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--discard-port", type=int, required=True)
    s.add_argument("--echo-port", type=int, required=True)
    b = sub.add_parser("bulk")
    b.add_argument("--dst", required=True)
    b.add_argument("--size", type=int, required=True)
    b.add_argument("--timeout", type=float, default=30.0)
    r = sub.add_parser("rate")
    r.add_argument("--dst", required=True)
    r.add_argument("--conns", type=int, default=1)
    r.add_argument("--seconds", type=float, default=5.0)
    r.add_argument("--warmup", type=float, default=0.5)
    r.add_argument("--msg", type=int, default=64)
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a)
        return
    try:
        out = bulk(a) if a.cmd == "bulk" else rate(a)
    except OSError as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
