"""Wiring of one sidecar process: load the lab context, bind the listeners, say ready, serve.

Listeners (§6 ports): 15001 outbound, 15006 inbound, 15008 HBONE inbound (only when this pod
is labelled ``networking.istio.io/tunnel=http``), 15021 readiness. All bind 0.0.0.0 like
Envoy's virtual listeners; REDIRECT delivers to them with the pod IP as local address.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from netlab import child_setup, istio
from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.connlog import ConnLog
from netlab.mesh.relay import install_fast_loop
from netlab.mesh.sidecar.base import (accept_loop, announce_ready, find_workload, pod_labels, serve_readiness,
                                      setup_logging)
from netlab.mesh.sidecar.inbound import HboneInbound, Inbound
from netlab.mesh.sidecar.outbound import Outbound, default_baggage
from netlab.mesh.sockets import listener

log = logging.getLogger("netlab.mesh.sidecar")


@dataclass
class Ports:
    """Overridable for loopback tests; the defaults are Istio's."""

    outbound: int = istio.SIDECAR_OUTBOUND_PORT
    inbound: int = istio.SIDECAR_INBOUND_PORT
    hbone: int = istio.HBONE_PORT
    readiness: int = istio.READINESS_PORT
    host: str = "0.0.0.0"


@dataclass
class Sidecar:
    ctx: MeshContext
    pod_ref: str
    ports: Ports = field(default_factory=Ports)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _closers: list[Any] = field(default_factory=list)

    @property
    def component(self) -> str:
        ns, _, name = self.pod_ref.partition("/")
        return f"{name}.{ns}-sidecar"

    async def start(self) -> dict[str, Any]:
        """Bind everything; returns the fields of the ready line."""
        ctx, me = self.ctx, find_workload(self.ctx, self.pod_ref)
        cert, key = ctx.cert_for(me.identity)
        version = pod_labels(ctx.state_dir, self.pod_ref).get("version", "latest")
        clog = ConnLog(ctx.conn_log_path(self.component))
        out = Outbound(reg=ctx.registry, me=me, cert=(str(cert), str(key)), ca=str(ctx.ca_cert), conn_log=clog,
                       component=self.component, baggage=default_baggage(me, version),
                       listener_port=self.ports.outbound)
        inb = Inbound(me=me, conn_log=clog, component=self.component, listener_port=self.ports.inbound)
        loop = asyncio.get_running_loop()
        bound = []
        for port, handler in ((self.ports.outbound, out.on_accept), (self.ports.inbound, inb.on_accept)):
            s = listener(self.ports.host, port)
            self._closers.append(s)
            t = loop.create_task(accept_loop(s, handler, self._tasks))
            self._tasks.add(t)
            bound.append(port)
        if me.native_hbone:
            hb = HboneInbound(reg=ctx.registry, me=me, cert=(str(cert), str(key)), ca=str(ctx.ca_cert),
                              conn_log=clog, component=self.component, listener_port=self.ports.hbone)
            await hb.server.start(host=self.ports.host, port=self.ports.hbone)
            self._closers.append(hb.server)
            bound.append(self.ports.hbone)
        ready = await serve_readiness(self.ports.host, self.ports.readiness)
        self._closers.append(ready)
        bound.append(self.ports.readiness)
        return {"component": self.component, "pod": self.pod_ref, "ip": me.ip, "identity": me.identity,
                "native_hbone": me.native_hbone, "ports": bound}

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for c in self._closers:
            if isinstance(c, socket.socket):
                c.close()
            elif hasattr(c, "wait_closed"):
                c.close()
            else:
                await c.close()


async def _run(lab: str, pod: str) -> None:
    sc = Sidecar(MeshContext.for_lab(lab), pod)
    info = await sc.start()
    announce_ready(**info)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sc.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netlab.mesh.sidecar", description="istio-proxy sidecar of a netlab pod")
    p.add_argument("--lab", required=True)
    p.add_argument("--pod", required=True, help="<namespace>/<name>")
    a = p.parse_args(argv)
    child_setup.setup()  # fd limit (two sockets per proxied connection); dies with the supervisor
    setup_logging(f"sidecar[{a.pod}]")
    install_fast_loop()
    asyncio.run(_run(a.lab, a.pod))
    return 0
