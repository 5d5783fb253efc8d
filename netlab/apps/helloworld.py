"""helloworld: Istio's samples/helloworld, which answers which version and instance served you.

``GET /hello`` -> ``Hello version: v1, instance: <pod name>\\n`` (the sample's exact text), so
tests that spread requests over several instances can count who answered.

    python -m netlab.apps.helloworld [--port 5000] [--version v1] [--name POD] [--log FILE]
"""

from __future__ import annotations

import os

from netlab import child_setup
from netlab.apps import _common
from netlab.apps._http import Request, Response, make_connection_handler


def make_handler(version: str, name: str):  # type: ignore[no-untyped-def]
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

    async def amain() -> None:
        cb = make_connection_handler(make_handler(args.version, name), log, "netlab-helloworld")
        servers, ports = await _common.listen(cb, args.bind, _common.ports_of(args))
        _common.announce_ready(name, "helloworld", ports, version=args.version)
        await _common.serve_forever(servers)

    _common.run(amain)


if __name__ == "__main__":
    main()
