"""sink: a raw TCP endpoint for load tests, where HTTP parsing would only add noise.

``--mode sha256`` (default): read until the client half-closes (``shutdown(SHUT_WR)``), reply
with the 64-char hex sha256 of everything received plus ``\\n``, then close. The client compares
it with its own digest, which proves every byte crossed every hop intact and in order.
``--mode echo``: write every byte back as it arrives; close after the client half-closes.

It raises RLIMIT_NOFILE and listens with a 4096 backlog so 1000 concurrent connections work.

    python -m netlab.apps.sink --port 9000 [--mode sha256|echo] [--quiet] [--log FILE]
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable

from netlab import child_setup
from netlab.apps import _common

READ_SIZE = 256 * 1024


def make_handler(mode: str, log: _common.JsonLog | None
                 ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _common.peer_ip_port(writer.get_extra_info("peername"))
        t0, total, digest = time.monotonic(), 0, hashlib.sha256()
        error = None
        try:
            while chunk := await reader.read(READ_SIZE):
                total += len(chunk)
                if mode == "echo":
                    writer.write(chunk)
                    await writer.drain()
                else:
                    digest.update(chunk)
            if mode == "sha256":
                writer.write(digest.hexdigest().encode() + b"\n")
                await writer.drain()
        except ConnectionError as e:
            error = type(e).__name__
        finally:
            writer.close()
        if log:
            rec = {"client": f"{peer[0]}:{peer[1]}", "mode": mode, "bytes": total,
                   "dur_ms": round((time.monotonic() - t0) * 1000, 3)}
            if mode == "sha256":
                rec["sha256"] = digest.hexdigest()
            if error:
                rec["error"] = error
            log.emit(**rec)

    return on_connection


def main(argv: list[str] | None = None) -> None:
    p = _common.base_parser("netlab.apps.sink", 9000, "TCP sink (sha256 reply) / echo server")
    p.add_argument("--mode", choices=("sha256", "echo"), default="sha256")
    p.add_argument("--quiet", action="store_true", help="no per-connection log lines")
    args = p.parse_args(argv)
    nofile = child_setup.setup()  # fd limit; dies with the supervisor
    name = _common.pod_name(args)
    log = None if args.quiet else _common.JsonLog(args.log)
    _common.serve(args, "sink", name, make_handler(args.mode, log), mode=args.mode, nofile=nofile)


if __name__ == "__main__":
    main()
