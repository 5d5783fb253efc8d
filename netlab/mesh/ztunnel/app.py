"""Start one ztunnel: bind every listener, then announce readiness (ztunnel ``app.rs``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from netlab.mesh import sockets
from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.connlog import ConnLog
from netlab.mesh.ztunnel import inbound_passthrough, outbound, readiness
from netlab.mesh.ztunnel.authz import Authorizer, PolicyAuthorizer, for_registry
from netlab.mesh.ztunnel.config import ZtunnelConfig
from netlab.mesh.ztunnel.inbound import Inbound
from netlab.mesh.ztunnel.proxy import ProxyInputs, accept_factory

log = logging.getLogger("netlab.ztunnel")


@dataclass
class Ztunnel:
    """A running ztunnel; :meth:`close` stops every listener and in-flight connection."""

    pi: ProxyInputs
    servers: list[Any] = field(default_factory=list)
    inbound: Inbound | None = None

    @property
    def ports(self) -> dict[str, int]:
        c = self.pi.cfg
        return {"outbound": c.outbound_port, "inbound_plaintext": c.inbound_plaintext_port,
                "inbound": c.inbound_port, "readiness": c.readiness_port}

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        if self.inbound is not None:
            await self.inbound.server.close()
        for t in list(self.pi._tasks):
            t.cancel()
        if self.pi._tasks:
            await asyncio.gather(*self.pi._tasks, return_exceptions=True)
        self.pi.connlog.close()


class _PolicyConnLog:
    """Connection log that names the deciding policy on denied legs (``extra.policy``).

    The route functions call the authorizer and the listener writes the refused leg in the same
    event-loop step (no await between), so the authorizer's last verdict is this leg's."""

    def __init__(self, inner: ConnLog, authz: PolicyAuthorizer) -> None:
        self.inner, self.authz = inner, authz

    def write(self, leg: Any) -> None:
        v = self.authz.last
        if v is not None and not v.allowed and leg.extra.get("reason") == "Denied":
            leg.extra["policy"] = v.policy
            leg.extra["rbac"] = v.reason
        self.inner.write(leg)

    def close(self) -> None:
        self.inner.close()


async def start(cfg: ZtunnelConfig, ctx: MeshContext, *, authz: Authorizer | None = None,
                connlog: ConnLog | None = None) -> Ztunnel:
    """Bind 15001/15006/15008 (IP_TRANSPARENT, TPROXY targets) and 15021; returns once all listen.

    ``authz`` defaults to the registry's policies (AllowAll when the topology has none)."""
    loop = asyncio.get_running_loop()
    authz = authz or for_registry(ctx.registry)
    log_ = connlog or ConnLog(ctx.conn_log_path(cfg.component))
    if isinstance(authz, PolicyAuthorizer):
        log_ = _PolicyConnLog(log_, authz)  # type: ignore[assignment]
    pi = ProxyInputs(cfg=cfg, ctx=ctx, connlog=log_, authz=authz)
    zt = Ztunnel(pi)
    try:
        for port, handler in ((cfg.outbound_port, outbound.handle),
                              (cfg.inbound_plaintext_port, inbound_passthrough.handle)):
            lsock = sockets.listener(cfg.bind, port, transparent=cfg.transparent)
            # create_server listens again on a given socket, with its own backlog (100 by default)
            zt.servers.append(await loop.create_server(accept_factory(pi, handler), sock=lsock,
                                                       backlog=sockets.LISTEN_BACKLOG))
        zt.inbound = Inbound(pi)
        await zt.inbound.server.start(sockets.listener(cfg.bind, cfg.inbound_port, transparent=cfg.transparent))
        zt.servers.append(await readiness.start(cfg.bind, cfg.readiness_port))
    except BaseException:
        await zt.close()
        raise
    return zt


async def run(cfg: ZtunnelConfig, ctx: MeshContext) -> None:
    """Serve until SIGTERM/SIGINT. The ready line goes to stdout only after every bind worked."""
    zt = await start(cfg, ctx)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(json.dumps({"event": "ready", "app": "ztunnel", "name": cfg.component, "node": cfg.node,
                                 "ip": cfg.own_ip, "pid": os.getpid(), "ports": zt.ports,
                                 "transparent": cfg.transparent}, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    await stop.wait()
    await zt.close()
