"""Readiness :15021 ``GET /healthz/ready`` -> 200 (ztunnel ``readiness.rs``), once every proxy
listener is bound. Anything else -> 404. One request per connection; HTTP/1.x only."""

from __future__ import annotations

import asyncio

READY_PATH = "/healthz/ready"


def _response(status: int, reason: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        parts = head.split(b"\r\n", 1)[0].split()
        path = parts[1].decode(errors="replace").split("?", 1)[0] if len(parts) >= 2 else ""
        if parts and parts[0] == b"GET" and path == READY_PATH:
            writer.write(_response(200, "OK", b"ready\n"))
        else:
            writer.write(_response(404, "Not Found", b"not found\n"))
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def start(host: str, port: int) -> asyncio.AbstractServer:
    return await asyncio.start_server(_serve, host, port, reuse_address=True)
