"""Start one ztunnel: bind every listener, then announce readiness (ztunnel ``app.rs``).

1.18 (TPROXY into ztunnel's own netns): 15001, 15006, 15008 and 15021 there. In-pod: 15021 in
its own netns, and a proxy per enrolled pod inside that pod (:mod:`.inpod`); ready once the node
agent's first snapshot is in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab.mesh import sockets
from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.connlog import ConnLog, Leg
from netlab.mesh.legs import LegRecorder, LegWriter
from netlab.mesh.process import serve_readiness
from netlab.mesh.relay import TcpStream, accepting_tcp_streams
from netlab.mesh.ztunnel import inbound_passthrough, outbound
from netlab.mesh.ztunnel.authz import Authorizer, PolicyAuthorizer, for_registry
from netlab.mesh.ztunnel.config import ZtunnelConfig
from netlab.mesh.ztunnel.inbound import Inbound
from netlab.mesh.ztunnel.inpod import InpodManager
from netlab.mesh.ztunnel.proxy import ProxyInputs

log = logging.getLogger("netlab.ztunnel")


@dataclass
class Ztunnel:
    """A running ztunnel; :meth:`close` stops every listener and in-flight connection."""

    pi: ProxyInputs
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    inbound: Inbound | None = None
    inpod: InpodManager | None = None

    @property
    def ports(self) -> dict[str, int]:
        c = self.pi.cfg
        return {"outbound": c.outbound_port, "inbound_plaintext": c.inbound_plaintext_port,
                "inbound": c.inbound_port, "readiness": c.readiness_port}

    @property
    def ready_fields(self) -> dict[str, Any]:
        c = self.pi.cfg
        fields = {"app": "ztunnel", "name": c.component, "node": c.node, "ip": c.own_ip, "ports": self.ports,
                  "transparent": c.transparent}
        if self.inpod is not None:
            fields.update(mode="inpod", zds=str(c.zds), pods=self.inpod.pods())
        return fields

    async def close(self) -> None:
        if self.inpod is not None:
            await self.inpod.close()
        for s in self.servers:
            s.close()
        if self.inbound is not None:
            await self.inbound.server.close()
        for t in list(self.pi._tasks):
            t.cancel()
        if self.pi._tasks:
            await asyncio.gather(*self.pi._tasks, return_exceptions=True)
        self.pi.legs.close()


class _PolicyConnLog:
    """Connection log that names the deciding policy on denied legs (``extra.policy``).

    The route functions call the authorizer and the listener writes the refused leg in the same
    event-loop step (no await between), so the authorizer's last verdict is this leg's."""

    def __init__(self, inner: LegWriter, authz: PolicyAuthorizer) -> None:
        self.inner, self.authz = inner, authz

    def write(self, leg: Leg) -> None:
        v = self.authz.last
        if v is not None and not v.allowed and leg.extra.get("reason") == "Denied":
            leg.extra["policy"] = v.policy
            leg.extra["rbac"] = v.reason
        self.inner.write(leg)

    def close(self) -> None:
        self.inner.close()


def _accepting(pi: ProxyInputs, handler: Callable[[ProxyInputs, TcpStream], Coroutine[Any, Any, None]]
               ) -> Callable[[], asyncio.Protocol]:
    """Each accepted connection: a TcpStream, and a task running ``handler`` for it."""
    return accepting_tcp_streams(lambda down: pi.spawn(handler(pi, down)))


async def start(cfg: ZtunnelConfig, ctx: MeshContext, *, authz: Authorizer | None = None,
                connlog: LegWriter | None = None) -> Ztunnel:
    """Bind 15001/15006/15008 (IP_TRANSPARENT, TPROXY targets) and 15021; returns once all listen.

    ``authz`` defaults to the registry's policies (AllowAll when the topology has none)."""
    loop = asyncio.get_running_loop()
    authz = authz or for_registry(ctx.registry)
    writer: LegWriter = connlog or ConnLog(ctx.conn_log_path(cfg.component))
    if isinstance(authz, PolicyAuthorizer):
        writer = _PolicyConnLog(writer, authz)
    pi = ProxyInputs(cfg=cfg, ctx=ctx, legs=LegRecorder(cfg.component, writer), authz=authz)
    zt = Ztunnel(pi)
    if cfg.zds is not None:
        return await _start_inpod(zt, cfg.zds)
    try:
        for port, handler in ((cfg.outbound_port, outbound.handle),
                              (cfg.inbound_plaintext_port, inbound_passthrough.handle)):
            lsock = sockets.listener(cfg.bind, port, transparent=cfg.transparent)
            # create_server listens again on a given socket, with its own backlog (100 by default)
            zt.servers.append(await loop.create_server(_accepting(pi, handler), sock=lsock,
                                                       backlog=sockets.LISTEN_BACKLOG))
        zt.inbound = Inbound(pi)
        await zt.inbound.server.start(sockets.listener(cfg.bind, cfg.inbound_port, transparent=cfg.transparent))
        zt.servers.append(await serve_readiness(cfg.bind, cfg.readiness_port))
    except BaseException:
        await zt.close()
        raise
    return zt


async def _start_inpod(zt: Ztunnel, zds: Path) -> Ztunnel:
    """In-pod: no listener in our own netns but readiness; the node agent's pods, each with its
    proxy in its own netns, then ready (ztunnel's readiness waits for the first snapshot)."""
    try:
        zt.inpod = await InpodManager(zt.pi, zds).start()
        await zt.inpod.first_snapshot.wait()
        zt.servers.append(await serve_readiness(zt.pi.cfg.bind, zt.pi.cfg.readiness_port, zt.inpod.ready))
    except BaseException:
        await zt.close()
        raise
    return zt
