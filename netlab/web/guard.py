"""The gate in front of every ``netlab ui`` request (a plain ASGI middleware, no framework magic).

The UI runs as root, so whoever can make it act can send requests in the labs and read their
captures. Who might try, and what stops them:

* **a page on another origin** in the user's own browser (CSRF): it cannot read our responses,
  so it never learns the token; every request that changes anything (POST) must carry the token
  in the ``X-Netlab-Token`` header, which a cross-origin page can only send after a CORS
  preflight this server never answers; a present ``Origin`` must be our own.
* **DNS rebinding** (``evil.example`` re-pointed to 127.0.0.1): the browser then sends
  ``Host: evil.example``; only the exact ``host:port`` pairs we listen on are accepted.
* **another local user** (127.0.0.1 is everybody's): every request needs the token, printed
  once at start for the user who ran ``netlab ui``; it is compared in constant time
  (:func:`hmac.compare_digest`). The browser keeps it in an HttpOnly, SameSite=Strict cookie,
  set when the printed URL (``/?token=...``) is opened.
* **a network peer** when the user chose a non-loopback address (``--allow-remote``): the same
  token, over plain HTTP, so only on a network the user trusts (said at start).

Responses also get ``nosniff``, ``no-store``, ``no-referrer`` and ``frame-ancestors 'none'``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "netlab_ui"
HEADER = "x-netlab-token"
SAFE_METHODS = ("GET", "HEAD")
EXTRA_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"),
                 (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                 (b"cross-origin-resource-policy", b"same-origin")]


def allowed_hosts(host: str, port: int) -> set[str]:
    """The ``Host`` header values a browser sends for this server (never a DNS name but localhost)."""
    names = {host, "127.0.0.1", "localhost", "[::1]"} if host in ("127.0.0.1", "::1", "localhost") else {host}
    return {f"[{n}]:{port}" if ":" in n and not n.startswith("[") else f"{n}:{port}" for n in names}


def same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode("utf-8", "replace"), b.encode())


class Guard:
    """ASGI middleware: Host check, token (cookie or header), CSRF rule, security headers."""

    def __init__(self, app: ASGIApp, *, token: str, hosts: set[str]) -> None:
        self.app, self.token, self.hosts = app, token, hosts
        self.origins = {f"http://{h}" for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope.get("headers") or []:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        method = scope.get("method", "GET")
        if headers.get("host") not in self.hosts:
            await _plain(send, 421, "netlab ui: this Host is not served here (DNS rebinding guard)")
            return
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            await _plain(send, 403, "netlab ui: cross-origin request refused")
            return
        header_ok = same(headers.get(HEADER), self.token)
        cookie_ok = same(_cookie(headers.get("cookie", "")), self.token)
        if scope.get("path") == "/" and method in SAFE_METHODS:
            qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if same((qs.get("token") or [None])[0], self.token):  # the printed URL: keep it in a cookie
                await _redirect_with_cookie(send, self.token)
                return
        if not (header_ok or cookie_ok):
            await _plain(send, 401, "netlab ui: open the URL `netlab ui` printed (it carries the access token)")
            return
        if method not in SAFE_METHODS and not header_ok:
            await _plain(send, 403, "netlab ui: a request that acts needs the X-Netlab-Token header")
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers") or []) + EXTRA_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _cookie(raw: str) -> str | None:
    try:
        c = SimpleCookie(raw)
    except CookieError:
        return None
    m = c.get(COOKIE)
    return m.value if m is not None else None


async def _plain(send: Send, status: int, text: str) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())] + EXTRA_HEADERS})
    await send({"type": "http.response.body", "body": body})


async def _redirect_with_cookie(send: Send, token: str) -> None:
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict".encode()
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", b"/"), (b"set-cookie", cookie), (b"content-length", b"0")] + EXTRA_HEADERS})
    await send({"type": "http.response.body", "body": b""})


__all__ = ["COOKIE", "HEADER", "Guard", "allowed_hosts", "same"]
