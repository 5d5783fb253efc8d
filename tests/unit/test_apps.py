"""Sample apps on loopback: start each as a real subprocess, talk to it over sockets, check bytes.

No root and no namespaces needed: everything binds 127.0.0.1 with ``--port 0`` and learns the
port from the ready line.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import random
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


class App:
    def __init__(self, proc: subprocess.Popen[str], ready: dict) -> None:
        self.proc, self.ready = proc, ready
        self.port: int = ready["ports"][0]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _start(module: str, *args: str, env: dict[str, str] | None = None) -> App:
    proc = subprocess.Popen([sys.executable, "-m", f"netlab.apps.{module}", "--bind", "127.0.0.1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    line = proc.stdout.readline()  # the ready line comes first
    if not line:
        proc.kill()
        raise AssertionError(f"{module} died before ready: {proc.stderr.read()}")
    ready = json.loads(line)
    assert ready["event"] == "ready" and ready["pid"] == proc.pid
    return App(proc, ready)


@pytest.fixture
def start() -> Iterator:
    apps: list[App] = []

    def _s(module: str, *args: str, **kw) -> App:
        a = _start(module, *args, **kw)
        apps.append(a)
        return a

    yield _s
    for a in apps:
        a.proc.terminate()
        a.proc.wait(5)
        a.proc.stdout.close()
        a.proc.stderr.close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


# ---- httpbin ---------------------------------------------------------------------------------


def test_httpbin_get_shape(start) -> None:
    app = start("httpbin", "--port", "0")
    st, body, hdrs = get(app.url("/get?a=1&a=2&b=x"), {"X-Test": "yes"})
    assert st == 200 and hdrs["Content-Type"] == "application/json"
    d = json.loads(body)
    assert set(d) == {"args", "headers", "origin", "url"}
    assert d["args"] == {"a": ["1", "2"], "b": "x"}
    assert d["headers"]["X-Test"] == "yes" and d["headers"]["Host"] == f"127.0.0.1:{app.port}"
    assert d["origin"] == "127.0.0.1"
    assert d["url"] == f"http://127.0.0.1:{app.port}/get?a=1&a=2&b=x"
    assert json.loads(get(app.url("/headers"), {"X-A": "b"})[1])["headers"]["X-A"] == "b"


def test_httpbin_origin_is_tcp_peer(start) -> None:
    """origin must be the peer address (not a header): bind the client to 127.0.0.2 and see it."""
    app = start("httpbin", "--port", "0")
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=5, source_address=("127.0.0.2", 0))
    conn.request("GET", "/ip", headers={"X-Forwarded-For": "10.9.9.9"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read()) == {"origin": "127.0.0.2"}
    conn.close()


def test_httpbin_status_codes(start) -> None:
    app = start("httpbin", "--port", "0")
    for code in (200, 201, 204, 404, 418, 503):
        assert get(app.url(f"/status/{code}"))[0] == code
    assert get(app.url("/status/999"))[0] == 400
    assert get(app.url("/nope"))[0] == 404


def test_httpbin_bytes_seeded(start) -> None:
    app = start("httpbin", "--port", "0")
    st, body, hdrs = get(app.url("/bytes/5000?seed=42"))
    assert st == 200 and len(body) == 5000 and hdrs["Content-Length"] == "5000"
    assert body == random.Random(42).randbytes(5000)
    assert get(app.url("/bytes/5000?seed=43"))[1] != body
    assert len(get(app.url("/bytes/0"))[1]) == 0


def test_httpbin_stream_bytes_chunked(start) -> None:
    app = start("httpbin", "--port", "0")
    with socket.create_connection(("127.0.0.1", app.port), timeout=5) as s:
        s.sendall(b"GET /stream-bytes/100000?seed=7&chunk_size=4096 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    data, chunks = b"", 0
    while True:
        size_s, _, body = body.partition(b"\r\n")
        n = int(size_s, 16)
        if n == 0:
            break
        assert n <= 4096
        data, body, chunks = data + body[:n], body[n + 2:], chunks + 1
    assert len(data) == 100000 and chunks == 25
    again = get(app.url("/stream-bytes/100000?seed=7&chunk_size=4096"))[1]  # urllib de-chunks
    assert again == data


def test_httpbin_delay(start) -> None:
    app = start("httpbin", "--port", "0")
    t = time.monotonic()
    st, body, _ = get(app.url("/delay/1?x=y"))
    assert st == 200 and time.monotonic() - t >= 1.0
    assert json.loads(body)["args"] == {"x": "y"}


def test_httpbin_anything_post_json_and_form(start) -> None:
    app = start("httpbin", "--port", "0")
    req = urllib.request.Request(app.url("/anything/deep/path?q=1"), data=b'{"k": [1, 2]}', method="POST",
                                 headers={"Content-Type": "application/json"})
    d = json.loads(urllib.request.urlopen(req, timeout=5).read())
    assert d["method"] == "POST" and d["json"] == {"k": [1, 2]} and d["data"] == '{"k": [1, 2]}'
    assert d["args"] == {"q": "1"} and d["url"].endswith("/anything/deep/path?q=1") and d["origin"] == "127.0.0.1"
    req = urllib.request.Request(app.url("/post"), data=b"a=1&b=2", method="POST")
    d = json.loads(urllib.request.urlopen(req, timeout=5).read())
    assert d["form"] == {"a": "1", "b": "2"}
    assert get(app.url("/post"))[0] == 405


def test_httpbin_chunked_request_body(start) -> None:
    app = start("httpbin", "--port", "0")
    with socket.create_connection(("127.0.0.1", app.port), timeout=5) as s:
        s.sendall(b"PUT /put HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                  b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 200 OK")
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["data"] == "hello world"


def test_httpbin_keepalive_and_request_log(start, tmp_path: Path) -> None:
    log = tmp_path / "req.log"
    app = start("httpbin", "--port", "0", "--log", str(log))
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=5)
    conn.request("GET", "/get")
    r1 = conn.getresponse()
    r1.read()
    local_port = conn.sock.getsockname()[1]
    conn.request("GET", "/status/201")
    r2 = conn.getresponse()
    r2.read()
    assert r1.status == 200 and r2.status == 201
    assert conn.sock.getsockname()[1] == local_port  # same TCP connection
    conn.close()
    time.sleep(0.1)
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["method"], r["path"], r["status"]) for r in recs] == [("GET", "/get", 200), ("GET", "/status/201", 201)]
    assert all(r["client"] == f"127.0.0.1:{local_port}" for r in recs)
    assert recs[0]["bytes"] > 0 and recs[1]["bytes"] == 0 and "time" in recs[0]


def test_httpbin_connection_close_and_bad_request(start) -> None:
    app = start("httpbin", "--port", "0")
    with socket.create_connection(("127.0.0.1", app.port), timeout=5) as s:
        s.sendall(b"GET /ip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):  # server must close, or this times out
            raw += chunk
    assert b"Connection: close" in raw and raw.count(b"HTTP/1.1 ") == 1
    with socket.create_connection(("127.0.0.1", app.port), timeout=5) as s:
        s.sendall(b"garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")


def test_httpbin_multiple_ports(start) -> None:
    app = start("httpbin", "--port", "0", "--port", "0")
    p1, p2 = app.ready["ports"]
    assert p1 != p2
    for p in (p1, p2):
        assert get(f"http://127.0.0.1:{p}/ip")[0] == 200


# ---- helloworld ------------------------------------------------------------------------------


def test_helloworld(start) -> None:
    app = start("helloworld", "--port", "0", "--name", "helloworld-v2-abc", "--version", "v2")
    st, body, _ = get(app.url("/hello"))
    assert (st, body) == (200, b"Hello version: v2, instance: helloworld-v2-abc\n")
    assert get(app.url("/other"))[0] == 404


def test_helloworld_defaults_from_env(start) -> None:
    app = start("helloworld", "--port", "0", env={"POD_NAME": "pod-7", "SERVICE_VERSION": "v1"})
    assert get(app.url("/hello"))[1] == b"Hello version: v1, instance: pod-7\n"


# ---- sink ------------------------------------------------------------------------------------


def _sink_roundtrip(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_sink_sha256(start) -> None:
    app = start("sink", "--port", "0")
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    assert _sink_roundtrip(app.port, data) == hashlib.sha256(data).hexdigest().encode() + b"\n"
    assert _sink_roundtrip(app.port, b"") == hashlib.sha256(b"").hexdigest().encode() + b"\n"


def test_sink_echo(start) -> None:
    app = start("sink", "--port", "0", "--mode", "echo")
    data = random.Random(2).randbytes(1024 * 1024)
    assert _sink_roundtrip(app.port, data) == data


def test_sink_1000_concurrent_connections(start) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    app = start("sink", "--port", "0", "--quiet")
    assert app.ready["nofile"] >= 2048
    n = 1000

    async def one(i: int, opened: asyncio.Event, count: list[int]) -> bool:
        r, w = await asyncio.open_connection("127.0.0.1", app.port)
        count[0] += 1
        if count[0] == n:
            opened.set()
        await opened.wait()  # all 1000 are open at the same time before anyone finishes
        data = i.to_bytes(4, "big") * 2048
        w.write(data)
        await w.drain()
        w.write_eof()
        reply = await r.read()
        w.close()
        return reply == hashlib.sha256(data).hexdigest().encode() + b"\n"

    async def main() -> list[bool]:
        opened, count = asyncio.Event(), [0]
        return await asyncio.wait_for(asyncio.gather(*(one(i, opened, count) for i in range(n))), 60)

    results = asyncio.run(main())
    assert sum(results) == n
