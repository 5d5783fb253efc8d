"""``python -m netlab.mesh.waypoint --lab LAB --pod NS/NAME``: HBONE on 15008, readiness on 15021."""

from __future__ import annotations

import argparse
import asyncio
import signal

from netlab import child_setup, istio
from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.connlog import ConnLog
from netlab.mesh.relay import install_fast_loop
from netlab.mesh.sidecar.base import announce_ready, find_workload, pod_labels, serve_readiness, setup_logging
from netlab.mesh.waypoint.proxy import Waypoint


async def _run(lab: str, pod: str) -> None:
    ctx = MeshContext.for_lab(lab)
    me = find_workload(ctx, pod)
    cert, key = ctx.cert_for(me.identity)
    scope = pod_labels(ctx.state_dir, pod).get(istio.LABEL_FOR_SERVICE_ACCOUNT)
    component = f"{me.name}.{me.namespace}"
    wp = Waypoint(reg=ctx.registry, me=me, cert=(str(cert), str(key)), ca=str(ctx.ca_cert),
                  conn_log=ConnLog(ctx.conn_log_path(component)), component=component, scope_sa=scope)
    await wp.server.start(host="0.0.0.0", port=istio.HBONE_PORT)
    ready = await serve_readiness("0.0.0.0", istio.READINESS_PORT)
    announce_ready(component=component, pod=pod, ip=me.ip, identity=me.identity, scope_sa=scope,
                   ports=[istio.HBONE_PORT, istio.READINESS_PORT])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    ready.close()
    await wp.server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netlab.mesh.waypoint", description="waypoint proxy of a netlab lab")
    p.add_argument("--lab", required=True)
    p.add_argument("--pod", required=True, help="<namespace>/<name>")
    a = p.parse_args(argv)
    child_setup.setup()  # fd limit (two sockets per proxied connection); dies with the supervisor
    setup_logging(f"waypoint[{a.pod}]")
    install_fast_loop()
    asyncio.run(_run(a.lab, a.pod))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
