"""A small HTTP/1.1 server on asyncio streams, just enough for httpbin and helloworld.

Why not http.server: it is thread-per-connection and blocking, and load tests push hundreds of
keep-alive connections through one app. Why not aiohttp: the apps stay stdlib-only so they start
in ~50 ms and run in any namespace with only the interpreter.

Supported: keep-alive (HTTP/1.1 default, HTTP/1.0 with ``Connection: keep-alive``),
``Content-Length`` and chunked request bodies, ``Expect: 100-continue``, HEAD, and streamed
(chunked) responses. Each request is logged as one JSON line.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote

from netlab.apps._common import JsonLog, peer_ip_port

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class Request:
    method: str
    target: str  # raw request-target, e.g. "/get?a=1"
    version: str  # "HTTP/1.1"
    headers: list[tuple[str, str]]
    body: bytes
    peer: tuple[str, int]  # TCP peer as the kernel reports it (after any NAT/TPROXY)
    local: tuple[str, int]

    @property
    def path(self) -> str:
        return unquote(self.target.split("?", 1)[0])

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def args(self) -> list[tuple[str, str]]:
        return parse_qsl(self.query, keep_blank_values=True)

    def header(self, name: str, default: str | None = None) -> str | None:
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return default


@dataclass
class Response:
    status: int = 200
    body: bytes | AsyncIterator[bytes] = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


class BadRequest(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, str, list[tuple[str, str]]] | None:
    """Request line and headers, or None on a clean EOF between requests."""
    line = await reader.readline()
    while line in (b"\r\n", b"\n"):  # RFC 9112 §2.2: ignore leading empty lines
        line = await reader.readline()
    if not line:
        return None
    try:
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ")
    except ValueError:
        raise BadRequest(f"malformed request line {line[:80]!r}") from None
    if not version.startswith("HTTP/1."):
        raise BadRequest(f"unsupported version {version!r}")
    headers: list[tuple[str, str]] = []
    size = len(line)
    while True:
        h = await reader.readline()
        size += len(h)
        if size > MAX_HEADER_BYTES:
            raise BadRequest("headers too large")
        if h in (b"\r\n", b"\n"):
            break
        if not h:
            raise BadRequest("EOF inside headers")
        name, sep, value = h.decode("latin-1").partition(":")
        if not sep:
            raise BadRequest(f"malformed header {h[:80]!r}")
        headers.append((name.strip(), value.strip()))
    return method, target, version, headers


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
    hd = {k.lower(): v for k, v in headers}
    if "chunked" in hd.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readline()
            try:
                n = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest(f"bad chunk size {size_line[:40]!r}") from None
            if n == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            total += n
            if total > MAX_BODY_BYTES:
                raise BadRequest("body too large")
            parts.append(await reader.readexactly(n))
            await reader.readline()
    n = int(hd.get("content-length", "0") or 0)
    if n < 0 or n > MAX_BODY_BYTES:
        raise BadRequest("bad content-length")
    return await reader.readexactly(n) if n else b""


def _keep_alive(version: str, headers: list[tuple[str, str]]) -> bool:
    conn = ",".join(v for k, v in headers if k.lower() == "connection").lower()
    if version == "HTTP/1.0":
        return "keep-alive" in conn
    return "close" not in conn


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


async def _write_response(writer: asyncio.StreamWriter, req_method: str, resp: Response, keep: bool,
                          server: str) -> int:
    """Write one response; returns body bytes sent (the number that goes in the access log)."""
    head = [f"HTTP/1.1 {resp.status} {_reason(resp.status)}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            f"Server: {server}",
            f"Content-Type: {resp.content_type}",
            "Access-Control-Allow-Origin: *",
            "Access-Control-Allow-Credentials: true",
            f"Connection: {'keep-alive' if keep else 'close'}"]
    head += [f"{k}: {v}" for k, v in resp.headers]
    no_body = req_method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
    if isinstance(resp.body, (bytes, bytearray)):
        head.append(f"Content-Length: {len(resp.body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if not no_body:
            writer.write(resp.body)
        await writer.drain()
        return 0 if no_body else len(resp.body)
    head.append("Transfer-Encoding: chunked")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    sent = 0
    if not no_body:
        async for chunk in resp.body:
            if chunk:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return sent


def make_connection_handler(handler: Handler, log: JsonLog, server: str
                            ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_ip_port(writer.get_extra_info("peername"))
        local = peer_ip_port(writer.get_extra_info("sockname"))
        try:
            while True:
                try:
                    head = await _read_head(reader)
                    if head is None:
                        return
                    method, target, version, headers = head
                    if (next((v for k, v in headers if k.lower() == "expect"), "").lower() == "100-continue"):
                        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                        await writer.drain()
                    body = await _read_body(reader, headers)
                except BadRequest as e:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    log.emit(client=f"{peer[0]}:{peer[1]}", error=str(e), status=400)
                    return
                t0 = time.monotonic()
                req = Request(method, target, version, headers, body, peer, local)
                keep = _keep_alive(version, headers)
                try:
                    resp = await handler(req)
                except Exception as e:  # noqa: BLE001 - a handler bug must not kill the connection silently
                    resp = Response(500, f"internal error: {e!r}\n".encode())
                sent = await _write_response(writer, method, resp, keep, server)
                log.emit(client=f"{peer[0]}:{peer[1]}", method=method, path=target, status=resp.status,
                         bytes=sent, dur_ms=round((time.monotonic() - t0) * 1000, 3))
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    return on_connection
