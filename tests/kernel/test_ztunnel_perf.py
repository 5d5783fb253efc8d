"""ztunnel datapath measurements (printed; loose bounds only catch gross regressions).

Run with ``-s`` to see the numbers:
``.venv/bin/pytest -s -m kernel tests/kernel/test_ztunnel_perf.py``.
The client runs in this process, on a thread switched into the sleep pod's netns, so the numbers
are the datapath's and not ``ip netns exec`` + curl start-up.
"""

from __future__ import annotations

import hashlib
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from netlab import netns as ns
from netlab.lab import Lab

pytestmark = pytest.mark.kernel
T = TypeVar("T")

TOPOLOGY = """\
name: hz-perf
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  foo: {labels: {istio.io/dataplane-mode: ambient}}
  bar: {labels: {istio.io/dataplane-mode: ambient}}
pods:
  - {name: sleep, namespace: foo, node: node-a, app: sleep, serviceAccount: sleep}
  - {name: httpbin, namespace: bar, node: node-b, app: httpbin, serviceAccount: httpbin, ports: [80], labels: {svc: remote}}
  - {name: httpbin-local, namespace: bar, node: node-a, app: httpbin, serviceAccount: httpbin, ports: [80], labels: {svc: local}}
  - {name: sink, namespace: bar, node: node-b, app: sink, serviceAccount: sink, ports: [9000]}
services:
  - {name: httpbin, namespace: bar, port: 8000, targetPort: 80, selector: {svc: remote}}
  - {name: httpbin-local, namespace: bar, port: 8000, targetPort: 80, selector: {svc: local}}
  - {name: sink, namespace: bar, port: 9000, targetPort: 9000, selector: {app: sink}}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    d = tmp_path_factory.mktemp("hz-perf")
    mp = pytest.MonkeyPatch()
    mp.setenv("NETLAB_RUN_DIR", str(d / "run"))
    topo = d / "hz-perf.yaml"
    topo.write_text(TOPOLOGY)
    lab = Lab.up(str(topo), name="hz-perf", tunnel="userspace")
    try:
        yield lab
    finally:
        Lab.down_lab("hz-perf")
        mp.undo()


@pytest.fixture(autouse=True)
def netlab_run_dir(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETLAB_RUN_DIR", str(lab.state_dir.parent))


def in_pod(lab: Lab, ref: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread inside the pod's netns (sockets it makes live there)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            with ns.in_netns(lab.pod(ref).netns):
                box["r"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["e"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]  # type: ignore[misc]
    return box["r"]  # type: ignore[return-value]


def vip(lab: Lab, name: str) -> tuple[str, int]:
    s = next(s for s in lab.plan.services if s.name == name)
    return s.vip, s.port


def http_get(dst: tuple[str, int], path: str = "/ip") -> bytes:
    with socket.create_connection(dst, timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        parts = []
        while d := s.recv(65536):
            parts.append(d)
    return b"".join(parts)


def latencies(dst: tuple[str, int], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = http_get(dst)
        out.append((time.perf_counter() - t) * 1000)
        assert r.startswith(b"HTTP/1.1 200"), r[:100]
    return out


def fmt(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"p50 {statistics.median(ms):.2f} ms  p90 {q[89]:.2f} ms  p99 {q[98]:.2f} ms  max {max(ms):.2f} ms"


def test_request_latency(lab: Lab) -> None:
    n = 200
    cross = in_pod(lab, "foo/sleep", lambda: latencies(vip(lab, "httpbin"), n))
    local = in_pod(lab, "foo/sleep", lambda: latencies(vip(lab, "httpbin-local"), n))
    print(f"\n[ztunnel] {n} sequential GET /ip, new connection each (new HBONE mTLS handshake cross-node)")
    print(f"[ztunnel]   cross-node HBONE : {fmt(cross)}")
    print(f"[ztunnel]   same-node fast   : {fmt(local)}")
    assert statistics.median(cross) < 100 and statistics.median(local) < 50


def bulk(dst: tuple[str, int], total: int) -> tuple[float, str, str]:
    block = os.urandom(1 << 20)
    h = hashlib.sha256()
    with socket.create_connection(dst, timeout=30) as s:
        t = time.perf_counter()
        sent = 0
        while sent < total:
            s.sendall(block)
            h.update(block)
            sent += len(block)
        s.shutdown(socket.SHUT_WR)  # half-close: the sink answers with the digest after EOF
        reply = b""
        while d := s.recv(4096):
            reply += d
        dt = time.perf_counter() - t
    return dt, reply.decode().strip(), h.hexdigest()


def test_bulk_throughput_one_stream_cross_node(lab: Lab) -> None:
    total = 256 << 20
    dt, got, want = in_pod(lab, "foo/sleep", lambda: bulk(vip(lab, "sink"), total))
    assert got == want
    mbps = total / dt / 1e6
    print(f"\n[ztunnel] one stream, {total >> 20} MiB cross-node over HBONE: {dt:.2f} s = {mbps:.0f} MB/s "
          f"({mbps * 8 / 1000:.2f} Gbit/s), sha256 verified after half-close")
    assert mbps > 5


def test_concurrent_streams_cross_node(lab: Lab) -> None:
    """64 parallel connections (64 HBONE tunnels), 4 MiB each, every digest checked."""
    import asyncio

    n, size = 64, 4 << 20
    dst = vip(lab, "sink")

    async def one(i: int) -> bool:
        data = hashlib.sha256(str(i).encode()).digest() * (size // 32)
        r, w = await asyncio.open_connection(*dst)
        w.write(data)
        await w.drain()
        w.write_eof()
        reply = (await r.read()).decode().strip()
        w.close()
        return reply == hashlib.sha256(data).hexdigest()

    async def main() -> tuple[list[bool], float]:
        t = time.perf_counter()
        res = await asyncio.gather(*(one(i) for i in range(n)))
        return list(res), time.perf_counter() - t

    ok, dt = in_pod(lab, "foo/sleep", lambda: asyncio.run(main()))
    assert all(ok), f"{ok.count(False)} of {n} streams corrupted or cut"
    print(f"\n[ztunnel] {n} parallel streams x {size >> 20} MiB cross-node: {dt:.2f} s = "
          f"{n * size / dt / 1e6:.0f} MB/s aggregate")
