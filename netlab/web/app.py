"""The routes of ``netlab ui`` on Starlette; every lab operation goes through a backend
(:class:`netlab.web.backend.LabBackend` for real labs), every request through :class:`Guard`.

    GET  /                                 the page (token in a meta tag for the page's own fetches)
    GET  /api/labs                         running labs with their health
    GET  /api/labs/{lab}                   status (processes' health), the figure, sources, destinations
    POST /api/labs/{lab}/trace             {"from": POD, "to": DEST} -> the trace, its pane, the verdict
    GET  /api/labs/{lab}/capture.pcapng    the capture of the last trace run here on that lab
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from netlab.errors import NetlabError
from netlab.web.backend import BadRequest, LastCapture
from netlab.web.guard import Guard
from netlab.web.page import page

MAX_BODY = 4096


class Backend(Protocol):
    def labs(self) -> list[dict[str, Any]]: ...
    def view(self, name: str) -> dict[str, Any]: ...
    def trace(self, name: str, src: object, dst: object) -> dict[str, Any]: ...
    def capture(self, name: str) -> LastCapture: ...


def build_app(backend: Backend, *, token: str, hosts: set[str]) -> Guard:
    """The ASGI application: Starlette routes behind the :class:`Guard`."""

    async def index(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return HTMLResponse(page(token, nonce), headers={"content-security-policy": csp})

    async def labs(request: Request) -> Response:
        return JSONResponse({"labs": await run_in_threadpool(backend.labs)})

    async def lab(request: Request) -> Response:
        return await _call(backend.view, request.path_params["lab"])

    async def trace(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "send JSON (content-type: application/json)"}, status_code=415)
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": "request too large"}, status_code=413)
        try:
            req = json.loads(body)
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if not isinstance(req, dict) or set(req) - {"from", "to"}:
            return JSONResponse({"error": 'expected {"from": POD, "to": DESTINATION}'}, status_code=400)
        return await _call(backend.trace, request.path_params["lab"], req.get("from"), req.get("to"))

    async def capture(request: Request) -> Response:
        try:
            last = await run_in_threadpool(backend.capture, request.path_params["lab"])
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        name = f"netlab-trace-{last.trace_id}.pcapng"
        return Response(last.pcapng, media_type="application/octet-stream",
                        headers={"content-disposition": f'attachment; filename="{name}"'})

    routes = [Route("/", index, methods=["GET"]), Route("/api/labs", labs, methods=["GET"]),
              Route("/api/labs/{lab}", lab, methods=["GET"]), Route("/api/labs/{lab}/trace", trace, methods=["POST"]),
              Route("/api/labs/{lab}/capture.pcapng", capture, methods=["GET"])]
    return Guard(Starlette(routes=routes), token=token, hosts=hosts)


async def _call(fn: Any, *args: Any) -> Response:
    try:
        return JSONResponse(await run_in_threadpool(fn, *args))
    except BadRequest as e:
        return JSONResponse({"error": str(e)}, status_code=e.status)
    except NetlabError as e:  # the lab said no (e.g. it went down meanwhile): one line, like the CLI
        return JSONResponse({"error": str(e)}, status_code=500)


__all__ = ["Backend", "build_app"]
