"""helloworld: Istio's samples/helloworld, which answers which version and instance served you.

``GET /hello`` -> ``Hello version: v1, instance: <pod name>\\n`` (the sample's exact text), so
tests that spread requests over several instances can count who answered.

    python -m netlab.apps.helloworld [--port 5000] [--version v1] [--name POD] [--log FILE]
"""

from __future__ import annotations

import os

from netlab import child_setup
from netlab.apps import _common
from netlab.apps._http import Handler, Request, Response, make_connection_handler


def make_handler(version: str, name: str) -> Handler:
    async def handle(req: Request) -> Response:
        if req.path == "/hello" and req.method in ("GET", "HEAD"):
            return Response(200, f"Hello version: {version}, instance: {name}\n".encode())
        if req.path == "/health":
            return Response(200, b"Helloworld is healthy\n")
        return Response(404, b"404 page not found\n")

    return handle


def main(argv: list[str] | None = None) -> None:
    p = _common.base_parser("netlab.apps.helloworld", 5000, "Istio helloworld sample")
    p.add_argument("--version", default=os.environ.get("SERVICE_VERSION", "v1"),
                   help="version string in the reply (default $SERVICE_VERSION or v1, like the sample)")
    args = p.parse_args(argv)
    child_setup.setup()  # fd limit; dies with the supervisor
    name = _common.pod_name(args)
    log = _common.JsonLog(args.log)
    cb = make_connection_handler(make_handler(args.version, name), log, "netlab-helloworld")
    _common.serve(args, "helloworld", name, cb, version=args.version)


if __name__ == "__main__":
    main()
