"""httpbin: the request-inspection server of Istio's samples, with httpbin.org's JSON shapes.

``origin`` is always the TCP peer address this process saw (never X-Forwarded-For): that is the
observable tests use to decide whether a hop preserved the client's source IP.

    python -m netlab.apps.httpbin --port 8080 [--port 8081] [--bind ADDR] [--name POD] [--log FILE]
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator
from typing import Any

from netlab import child_setup
from netlab.apps import _common
from netlab.apps._http import Handler, Request, Response, make_connection_handler

MAX_BYTES = 64 * 1024 * 1024  # httpbin.org caps at 100 KiB; load tests want more
MAX_DELAY = 10.0
JSON = "application/json"


def _multi(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """httpbin's MultiDict rendering: one value -> string, several -> list."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            out[k] = out[k] + [v] if isinstance(out[k], list) else [out[k], v]
        else:
            out[k] = v
    return out


def _headers(req: Request) -> dict[str, str]:
    # httpbin title-cases names (werkzeug's EnvironHeaders); repeated headers are comma-joined.
    out: dict[str, str] = {}
    for k, v in req.headers:
        name = "-".join(p.capitalize() for p in k.split("-"))
        out[name] = f"{out[name]},{v}" if name in out else v
    return out


def _url(req: Request) -> str:
    host = req.header("host") or f"{req.local[0]}:{req.local[1]}"
    return f"http://{host}{req.target}"


def _json(obj: Any, status: int = 200) -> Response:
    return Response(status, (json.dumps(obj, indent=2) + "\n").encode(), JSON)


def _anything(req: Request) -> dict[str, Any]:
    ctype = (req.header("content-type") or "").lower()
    data, form, parsed = "", {}, None
    if ctype.startswith("application/x-www-form-urlencoded"):
        from urllib.parse import parse_qsl
        form = _multi(parse_qsl(req.body.decode("latin-1"), keep_blank_values=True))
    else:
        data = req.body.decode("utf-8", "replace")
        if ctype.startswith("application/json"):
            try:
                parsed = json.loads(req.body or b"null")
            except ValueError:
                parsed = None
    return {"args": _multi(req.args()), "data": data, "files": {}, "form": form, "headers": _headers(req),
            "json": parsed, "method": req.method, "origin": req.peer[0], "url": _url(req)}


def _rng(req: Request) -> random.Random:
    seed = dict(req.args()).get("seed")
    return random.Random(int(seed)) if seed not in (None, "") and seed.lstrip("-").isdigit() else random.Random()


async def _stream(data_len: int, chunk: int, rng: random.Random) -> AsyncIterator[bytes]:
    left = data_len
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


_ROUTES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), n) for p, n in [
    (r"^/$", "index"), (r"^/get$", "get"), (r"^/headers$", "headers"), (r"^/ip$", "ip"),
    (r"^/user-agent$", "user_agent"), (r"^/status/([0-9,]+)$", "status"), (r"^/bytes/(\d+)$", "bytes"),
    (r"^/stream-bytes/(\d+)$", "stream_bytes"), (r"^/delay/([0-9.]+)$", "delay"),
    (r"^/anything(/.*)?$", "anything"), (r"^/(post|put|patch|delete)$", "method"),
]]


_GET_ONLY = {"index", "get", "headers", "ip", "user_agent", "bytes", "stream_bytes"}


def make_handler(name: str) -> Handler:
    async def handle(req: Request) -> Response:
        for pat, route in _ROUTES:  # noqa: B007 - the route found is used after the loop
            m = pat.match(req.path)
            if m:
                break
        else:
            return Response(404, b"404 page not found\n")
        if route in _GET_ONLY and req.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n")
        if route == "index":
            return Response(200, f"netlab httpbin {name}\n".encode())
        if route == "get":
            return _json({"args": _multi(req.args()), "headers": _headers(req), "origin": req.peer[0],
                          "url": _url(req)})
        if route == "headers":
            return _json({"headers": _headers(req)})
        if route == "ip":
            return _json({"origin": req.peer[0]})
        if route == "user_agent":
            return _json({"user-agent": req.header("user-agent")})
        if route == "status":
            codes = [int(c) for c in m.group(1).split(",") if c]
            code = random.choice(codes) if codes else 200
            if not 100 <= code <= 599:
                return Response(400, b"invalid status code\n")
            return Response(code, b"")
        if route == "bytes":
            n = min(int(m.group(1)), MAX_BYTES)
            return Response(200, _rng(req).randbytes(n), "application/octet-stream")
        if route == "stream_bytes":
            n = min(int(m.group(1)), MAX_BYTES)
            chunk = max(1, int(dict(req.args()).get("chunk_size", "10240") or 10240))
            return Response(200, _stream(n, chunk, _rng(req)), "application/octet-stream")
        if route == "delay":
            await asyncio.sleep(min(float(m.group(1)), MAX_DELAY))
            return _json(_anything(req))
        if route == "method":
            if req.method != m.group(1).upper():
                return Response(405, b"method not allowed\n")
            return _json(_anything(req))
        return _json(_anything(req))  # anything

    return handle


def main(argv: list[str] | None = None) -> None:
    args = _common.base_parser("netlab.apps.httpbin", 8080, (__doc__ or "httpbin").splitlines()[0]).parse_args(argv)
    child_setup.setup()  # fd limit; dies with the supervisor
    name = _common.pod_name(args)
    log = _common.JsonLog(args.log)
    _common.serve(args, "httpbin", name, make_connection_handler(make_handler(name), log, "netlab-httpbin"))


if __name__ == "__main__":
    main()
