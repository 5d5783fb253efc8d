"""ztunnel's in-pod mode (inpod reference §3; ztunnel 1.30.3 ``src/inpod/``): the same ztunnel
process, which gets each enrolled pod's netns from istio-cni over ZDS and runs that pod's
proxy *inside* it.

* :class:`InpodManager` (``workloadmanager.rs`` + ``statemanager.rs``): connects to the node
  agent's ZDS socket (retrying with backoff from 10 ms doubling to 15 s), sends ``ZdsHello``,
  handles each request and answers it with an ack (a nack carries the error). Rules it keeps, as
  1.30.3's state manager does: an ``add`` carries exactly one fd and a ``workload_info``, any other
  message none (otherwise a protocol error: nack and reconnect); an ``add`` for a pod it already
  runs from the same netns is a no-op, from another netns replaces it; ``keep`` is only allowed
  before ``snapshot_sent``, and ``snapshot_sent`` only once per connection; at ``snapshot_sent``
  every pod neither added nor kept since the connection began is shut down (reconcile). A
  ``del`` shuts the pod's proxy down at once: ``shutdown_workload`` drains with
  ``DrainMode::Immediate`` ("Workload is gone, so no need to gracefully clean it up",
  ``src/inpod/statemanager.rs``), so its listeners close and its established connections are
  reset (each leg is recorded with outcome ``reset``). Ready once connected with a snapshot.
* :class:`PodProxy` (``ProxyFactory::new_proxies_from_factory`` with the pod's
  ``InPodSocketFactory``): listeners on 15001, 15006 and 15008 (``IP_TRANSPARENT``) and the DNS
  proxy on ``127.0.0.1:15053`` (UDP and TCP), all made in the pod's netns with ``SO_MARK 1337``
  (:class:`~netlab.mesh.sockets.PodSocketFactory`); every upstream socket too, so outbound
  traffic leaves from the pod's own IP, and inbound traffic reaches the app from the peer's IP
  (transparent) over ``lo``, its replies steered back by mark 0x111 and table 100 (§1.7).

Connection-log legs stay the node's (component ``ztunnel-<node>``), each with ``extra.pod`` =
the pod whose netns the listener is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import istio
from netlab import netns as ns
from netlab.mesh import zds
from netlab.mesh.dns import codec as dns
from netlab.mesh.dns.names import ServiceNames
from netlab.mesh.dns.server import DnsServer, forward
from netlab.mesh.endpoint import Endpoint
from netlab.mesh.hbone import ConnectRequest, HboneServer
from netlab.mesh.registry import Workload
from netlab.mesh.relay import TcpStream, accepting_tcp_streams
from netlab.mesh.sockets import LISTEN_BACKLOG, PodSocketFactory
from netlab.mesh.ztunnel.config import LISTENER_OUTBOUND, LISTENER_PLAINTEXT
from netlab.mesh.ztunnel.inbound import serve_inbound
from netlab.mesh.ztunnel.proxy import ProxyInputs, serve_captured
from netlab.mesh.ztunnel.route import (
    Decision,
    plan_inbound_inpod,
    plan_outbound_inpod,
    plan_plaintext_inpod,
)

log = logging.getLogger("netlab.ztunnel")

LISTENER_DNS = f"dns:{istio.ZTUNNEL_DNS_PORT}"
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.01, 15.0  # workloadmanager.rs connect(): 10 ms, doubling, 15 s
DNS_BIND = "127.0.0.1"  # §3.2 (``[::1]`` too where lo has IPv6 and ztunnel IPv6 is on: not in the lab)


class ProtocolError(Exception):
    """A ZDS message the protocol does not allow here: nack it, then reconnect."""


@dataclass
class PodProxy:
    """One enrolled pod's proxy, inside the pod's netns (see the module docstring)."""

    pi: ProxyInputs
    uid: str
    wl: Workload
    netns_fd: int
    home_fd: int
    names: ServiceNames
    cookie: int = 0
    make: PodSocketFactory = field(init=False)
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)
    _hbone: HboneServer | None = None
    _dns: DnsServer | None = None
    _downs: set[TcpStream] = field(default_factory=set)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.make = PodSocketFactory(self.netns_fd, self.home_fd, istio.INPOD_MARK)
        self.cookie = ns.fd_cookie(self.netns_fd)

    @property
    def ports(self) -> list[int]:
        c = self.pi.cfg
        return [c.outbound_port, c.inbound_plaintext_port, c.inbound_port] + ([istio.ZTUNNEL_DNS_PORT] if self._dns else [])

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _starter(self, handler: Callable[[TcpStream], Coroutine[Any, Any, None]]) -> Callable[[TcpStream], None]:
        return lambda down: self._spawn(handler(down))

    async def start(self, cert: tuple[Path, Path] | None = None) -> PodProxy:
        """Listen in the pod (``cert``: the workload's, if the caller has it at hand)."""
        loop = asyncio.get_running_loop()
        c = self.pi.cfg
        socks: list[socket.socket] = []
        try:
            with self.make.inside():  # every socket in one visit to the pod's netns
                socks += [self.make.listener(c.bind, port, transparent=True)
                          for port in (c.outbound_port, c.inbound_plaintext_port, c.inbound_port)]
                if self.pi.registry.kube_dns() is not None:
                    socks += [self.make.udp(DNS_BIND, istio.ZTUNNEL_DNS_PORT),
                              self.make.listener(DNS_BIND, istio.ZTUNNEL_DNS_PORT, transparent=False)]
            out, plain, hbone, *dns_socks = socks
            for lsock, handler in ((out, self._outbound), (plain, self._plaintext)):
                self._servers.append(await loop.create_server(accepting_tcp_streams(self._starter(handler)), sock=lsock,
                                                              backlog=LISTEN_BACKLOG))
                socks.remove(lsock)
            cert = cert or self.pi.ctx.cert_for(self.wl.identity)
            self._hbone = HboneServer(handler=self._inbound, cert_for=lambda _ip: cert, default_cert=cert,
                                      ca=self.pi.ca, trust_domain=self.pi.registry.trust_domain,
                                      check_authority=False, on_relay_done=self.pi.legs.relay_done,
                                      non_connect_status=400)
            socks.remove(hbone)
            await self._hbone.start(hbone)
            if dns_socks:
                socks.clear()
                self._dns = await DnsServer(self._resolve).start(*dns_socks)
        except BaseException:
            for s in socks:  # made, not yet handed to a server
                s.close()
            await self.stop()
            raise
        log.info("pod %s (%s): proxy up in its netns, listening on %s", self.wl.ref, self.uid, self.ports)
        return self

    async def stop(self) -> None:
        """Shut down at once: listeners closed, established connections reset (DrainMode::Immediate)."""
        for s in self._servers:
            s.close()
        self._servers = []
        for d in list(self._downs):
            d.abort()
        if self._hbone is not None:
            await self._hbone.close()
            self._hbone = None
        if self._dns is not None:
            await self._dns.close()
            self._dns = None
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for t in list(self._tasks):
            t.cancel()
        if self.netns_fd >= 0:
            os.close(self.netns_fd)
            self.netns_fd = -1

    # ---- listeners ---------------------------------------------------------------------------
    async def _captured(self, down: TcpStream, listener: str, decide: Any) -> None:
        self._downs.add(down)
        try:
            await serve_captured(self.pi, down, listener, decide, make=self.make, pod=self.wl.ref)
        finally:
            self._downs.discard(down)

    async def _outbound(self, down: TcpStream) -> None:
        pi = self.pi

        def decide(_peer_ip: str, orig: tuple[str, int]) -> Decision:
            return plan_outbound_inpod(pi.registry, self.wl, orig, hbone_port=pi.cfg.hbone_port, rng=pi.rng)

        await self._captured(down, LISTENER_OUTBOUND, decide)

    async def _plaintext(self, down: TcpStream) -> None:
        pi = self.pi

        def decide(peer_ip: str, orig: tuple[str, int]) -> Decision:
            return plan_plaintext_inpod(pi.registry, self.wl, peer_ip, orig, authz=pi.authz)

        await self._captured(down, LISTENER_PLAINTEXT, decide)

    async def _inbound(self, req: ConnectRequest) -> int | Endpoint:
        pi = self.pi
        d = plan_inbound_inpod(pi.registry, self.wl, req.local_addr[0], req.peer_addr[0], req.peer_identities,
                               req.dest, authz=pi.authz)
        return await serve_inbound(pi, req, d, make=self.make, pod=self.wl.ref)

    async def _resolve(self, data: bytes, _peer: str) -> bytes | None:
        """The DNS proxy (ZDNS ``server.rs``): Service names from the registry, the rest
        forwarded from the pod's netns (marked: conntrack zone 1) to kube-dns."""
        try:
            q = dns.parse_query(data)
        except dns.DnsFormatError:
            return dns.error_for(data, dns.FORMERR)
        ips = self.names.for_pod(q.name, self.wl.namespace)
        if ips is not None:
            return dns.response(q, ips)
        up = self.pi.registry.kube_dns()
        got = await forward(data, (up.vip, up.port), make=self.make) if up is not None else None
        return got if got is not None else dns.error(q, dns.SERVFAIL)


@dataclass
class InpodManager:
    """ztunnel's workload proxy manager: the ZDS client and the pods' proxies."""

    pi: ProxyInputs
    path: Path
    proxies: dict[str, PodProxy] = field(default_factory=dict)
    connected: bool = False
    snapshot_received: bool = False
    snapshot_names: set[str] = field(default_factory=set)
    first_snapshot: asyncio.Event = field(default_factory=asyncio.Event)
    _home: int = -1
    _names: ServiceNames | None = None
    _task: asyncio.Task[None] | None = None
    #: (the registry it was made from, uid -> workload): a snapshot of N pods looked each one
    #: up by scanning every workload of the lab, N x (all pods) per node agent's snapshot
    _by_uid: tuple[object, dict[str, Workload]] = (None, {})
    _certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def ready(self) -> bool:
        return self.connected and self.snapshot_received

    async def start(self) -> InpodManager:
        self._home = ns.own_netns_fd()
        self._names = ServiceNames(self.pi.registry)
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for p in list(self.proxies.values()):
            await p.stop()
        self.proxies.clear()
        if self._home >= 0:
            os.close(self._home)
            self._home = -1

    async def run(self) -> None:
        backoff = BACKOFF_FIRST_S
        while True:
            try:
                sock = await zds.ZdsSocket.connect(str(self.path))
            except OSError as e:
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                log.info("zds: cannot connect to %s (%s); retrying in %gs", self.path, e, backoff)
                await asyncio.sleep(backoff)
                continue
            backoff = BACKOFF_FIRST_S
            try:
                await self.process(sock)
                log.info("zds: the node agent closed the connection")
            except (OSError, ProtocolError, zds.ZdsError) as e:
                log.warning("zds: connection ended: %s", e)
            finally:
                sock.close()
                self.connected = False

    async def process(self, sock: zds.ZdsSocket) -> None:
        """One connection: hello, then a request and its ack at a time until EOF."""
        self.snapshot_received = False
        self.snapshot_names.clear()
        await sock.send(zds.ZdsHello(istio.ZDS_VERSION_V1).encode())
        self.connected = True
        while True:
            data, fds = await sock.recv()
            if not data and not fds:
                return
            try:
                req = zds.decode_request(data)
                error = await self.handle(req, fds)
            except (ProtocolError, zds.ZdsError) as e:
                zds.close_fds(fds)
                await sock.send(zds.encode_response(zds.Ack(f"protocol error: {e}")))
                raise ProtocolError(str(e)) from None
            await sock.send(zds.encode_response(zds.Ack(error)))

    async def handle(self, req: zds.Request, fds: list[int]) -> str:
        """Apply one request; returns the ack's error ("" = success). Takes ownership of ``fds``."""
        if isinstance(req, zds.AddWorkload):
            if len(fds) != 1:
                raise ProtocolError(f"add carries {len(fds)} fds, not 1")
            if req.workload_info is None:
                raise ProtocolError("workload_info is required but not present")
            if not self.snapshot_received:
                self.snapshot_names.add(req.uid)
            return await self.add(req, fds[0])
        if fds:
            raise ProtocolError(f"{zds.describe(req)} carries fds")
        if isinstance(req, zds.KeepWorkload):
            if self.snapshot_received:
                raise ProtocolError("keep after snapshot_sent")
            self.snapshot_names.add(req.uid)
            return ""
        if isinstance(req, zds.DelWorkload):
            if not self.snapshot_received:
                self.snapshot_names.discard(req.uid)
                return ""
            await self.delete(req.uid)
            return ""
        if self.snapshot_received:
            raise ProtocolError("snapshot_sent received already")
        for uid in [u for u in self.proxies if u not in self.snapshot_names]:
            log.info("zds: pod %s was not in the snapshot; shutting its proxy down", uid)
            await self.delete(uid)
        self.snapshot_names.clear()
        self.snapshot_received = True
        self.first_snapshot.set()
        return ""

    def _workload(self, req: zds.AddWorkload) -> Workload | None:
        reg = self.pi.registry
        if self._by_uid[0] is not reg:
            self._by_uid = (reg, {w.uid: w for w in reg.workloads.values() if w.uid})
        wl = self._by_uid[1].get(req.uid)
        info = req.workload_info
        if wl is None and info is not None:
            wl = reg.pod(f"{info.namespace}/{info.name}")
        return wl

    async def add(self, req: zds.AddWorkload, fd: int) -> str:
        old = self.proxies.get(req.uid)
        if old is not None:
            if old.cookie == ns.fd_cookie(fd):
                os.close(fd)  # idempotent: the same pod in the same netns
                return ""
            await self.delete(req.uid)  # a new netns for the same pod: replace its proxy
        wl = self._workload(req)
        if wl is None:
            os.close(fd)
            return f"failed to start proxy: no workload {req.uid} in the registry"
        assert self._names is not None
        proxy = PodProxy(self.pi, req.uid, wl, fd, self._home, self._names)
        try:
            cert = self._certs.get(wl.identity)
            if cert is None:  # (a node's pods share a few identities: one look-up each)
                cert = self._certs[wl.identity] = self.pi.ctx.cert_for(wl.identity)
            await proxy.start(cert)  # (stop() in start's failure path closed the fd)
        except Exception as e:  # noqa: BLE001 - a proxy error is a nack, the connection stays
            await proxy.stop()  # (again, if start failed: it closes the fd once)
            log.warning("zds: pod %s: failed to start proxy: %s", wl.ref, e)
            return f"failed to start proxy: {e}"
        self.proxies[req.uid] = proxy
        return ""

    async def delete(self, uid: str) -> None:
        proxy = self.proxies.pop(uid, None)
        if proxy is not None:
            log.info("zds: pod %s (%s) deleted; shutting its proxy down", proxy.wl.ref, uid)
            await proxy.stop()

    def pods(self) -> list[str]:
        return sorted(p.wl.ref for p in self.proxies.values())
