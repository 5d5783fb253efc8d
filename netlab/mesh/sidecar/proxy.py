"""Wiring of one sidecar process: load the lab context, bind the listeners, say ready, serve.

Listeners (§6 ports): 15001 outbound, 15006 inbound, 15008 HBONE inbound (only when this pod
is labelled ``networking.istio.io/tunnel=http``), 15021 readiness. All bind 0.0.0.0 like
Envoy's virtual listeners; REDIRECT delivers to them with the pod IP as local address.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from netlab import istio
from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.connlog import ConnLog
from netlab.mesh.hbone import HboneServer
from netlab.mesh.process import run_pod_proxy, serve_readiness
from netlab.mesh.sidecar.inbound import HboneInbound, Inbound
from netlab.mesh.sidecar.outbound import Outbound, default_baggage
from netlab.mesh.sockets import accept_forever, listener

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
    ready_fields: dict[str, Any] = field(default_factory=dict)
    _tasks: set[asyncio.Future[Any]] = field(default_factory=set)
    _sockets: list[socket.socket] = field(default_factory=list)
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)
    _hbone: HboneServer | None = None

    @property
    def component(self) -> str:
        ns, _, name = self.pod_ref.partition("/")
        return f"{name}.{ns}-sidecar"

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def start(self) -> Sidecar:
        """Bind everything; :attr:`ready_fields` then holds the fields of the ready line."""
        ctx = self.ctx
        me = ctx.registry.pod(self.pod_ref)
        if me is None:
            raise SystemExit(f"pod {self.pod_ref!r} is not in the lab registry {ctx.state_dir}")
        cert, key = ctx.cert_for(me.identity)
        clog = ConnLog(ctx.conn_log_path(self.component))
        out = Outbound(reg=ctx.registry, me=me, cert=(str(cert), str(key)), ca=str(ctx.ca_cert), conn_log=clog,
                       component=self.component, baggage=default_baggage(me, me.label("version") or "latest"),
                       listener_port=self.ports.outbound)
        inb = Inbound(me=me, conn_log=clog, component=self.component, listener_port=self.ports.inbound)
        bound = []
        for port, on_accept in ((self.ports.outbound, out.on_accept), (self.ports.inbound, inb.on_accept)):
            s = listener(self.ports.host, port)
            self._sockets.append(s)
            self._spawn(accept_forever(s, on_accept, self._spawn, f"sidecar {port}"))
            bound.append(port)
        if me.native_hbone:
            hb = HboneInbound(reg=ctx.registry, me=me, cert=(str(cert), str(key)), ca=str(ctx.ca_cert),
                              conn_log=clog, component=self.component, listener_port=self.ports.hbone)
            self._hbone = await hb.server.start(host=self.ports.host, port=self.ports.hbone)
            bound.append(self.ports.hbone)
        self._servers.append(await serve_readiness(self.ports.host, self.ports.readiness))
        bound.append(self.ports.readiness)
        self.ready_fields = {"app": "sidecar", "name": self.component, "pod": self.pod_ref, "ip": me.ip,
                             "identity": me.identity, "native_hbone": me.native_hbone, "ports": bound}
        return self

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for s in self._sockets:
            s.close()
        for srv in self._servers:
            srv.close()
        if self._hbone is not None:
            await self._hbone.close()


def main(argv: list[str] | None = None) -> int:
    return run_pod_proxy(argv, kind="sidecar", description="istio-proxy sidecar of a netlab pod",
                         start=lambda ctx, pod: Sidecar(ctx, pod).start())
