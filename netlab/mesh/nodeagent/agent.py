"""istio-cni's node agent (inpod reference §2.3, §3.1; istio ``cni/pkg/nodeagent``), one per node.

It keeps the node's enrolled pods (its "cache": pod UID, name, namespace, service account, netns)
and serves two unix ``SOCK_SEQPACKET`` sockets in the lab's root-only ``zds/`` directory
(:class:`netlab.state.StateDir`):

* ``<node>.sock``, the ZDS server its ztunnel connects to (``/var/run/ztunnel/ztunnel.sock`` in a
  cluster). On each connection: read ``ZdsHello`` (V1), send the snapshot -- one ``add`` per pod
  with its netns fd in ``SCM_RIGHTS``, or ``keep`` when the netns cannot be opened (or is not the
  one the lab made: its cookie is checked against the ledger's) -- then ``snapshot_sent``; after
  that ``add``/``del`` as pods come and go. A run-time request waits for ztunnel's ack before the
  next; the snapshot goes up to :data:`SNAPSHOT_WINDOW` requests ahead of its acks (ztunnel still
  reads, handles and acks one at a time; docs/deviations.md).
* ``<node>.ctl``, requests at run time, one JSON object per datagram:
  ``{"op": "add" | "del", "pod": "<ns>/<name>"}`` enrols or unenrols one pod of this node (cache
  and every connected ztunnel), ``{"op": "list"}`` lists the cache; the answer is
  ``{"ok": bool, "error"?: str, "acks"?: [...], "pods"?: [...]}``. This is the hook a later
  ``netlab label`` uses; the agent hands netns over and takes them back, the pod's in-pod rules
  (plan/inpod.py) are the plan's, installed by apply.

Faithful to the agent in what ztunnel sees; not modelled: its pod informers, the
``ambient.istio.io/redirection`` annotation it writes, and the probe ipset, which apply fills.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import istio
from netlab import netns as ns
from netlab.kernel import ledger
from netlab.mesh import zds
from netlab.mesh.process import run_proxy
from netlab.plan.ambient import pod_uid
from netlab.plan.inpod import is_enrolled
from netlab.plan.types import Plan
from netlab.state import StateDir

log = logging.getLogger("netlab.nodeagent")

ACK_TIMEOUT_S = 5.0  # how long one request waits for ztunnel's ack (istio-cni: its read deadline)
#: snapshot requests sent ahead of their acks (ZtunnelConn.requests); each holds an fd in flight
SNAPSHOT_WINDOW = 32
CONTROL_MAX = 4096


@dataclass(frozen=True)
class PodEntry:
    """One pod as the agent knows it: what ``AddWorkload`` carries, and where its netns is."""

    uid: str
    name: str
    namespace: str
    service_account: str
    netns: str

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def add(self) -> zds.AddWorkload:
        return zds.AddWorkload(self.uid, zds.WorkloadInfo(self.name, self.namespace, self.service_account))


def pods_of(plan: Plan, node: str) -> tuple[list[PodEntry], dict[str, PodEntry]]:
    """(the node's enrolled pods, every application pod of the node by ``ns/name``)."""
    every = {p.ref: PodEntry(pod_uid(p), p.name, p.namespace, p.service_account, p.netns)
             for p in plan.pods if p.node == node and p.mode not in ("ztunnel", "waypoint")}
    enrolled = [every[p.ref] for p in plan.pods if p.node == node and is_enrolled(p)]
    return enrolled, every


def root_dir(d: Path) -> Path:
    """``d`` as root's 0700 directory (made here, or checked: no symlink, no other owner)."""
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise OSError(f"{d}: not a directory of ours; not listening there")
    os.chmod(d, 0o700)
    return d


def listen_seqpacket(path: Path) -> socket.socket:
    """A listening unix SOCK_SEQPACKET socket at ``path`` (a stale socket there is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.bind(str(path))
        os.chmod(path, 0o600)
        s.listen(16)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class ZtunnelConn:
    """One connected ztunnel: requests go one at a time, each answered by an ack."""

    def __init__(self, sock: zds.ZdsSocket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.lock = asyncio.Lock()
        self.acks: asyncio.Queue[zds.Ack | None] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def read_acks(self) -> None:
        """Every message ztunnel sends after its hello is a WorkloadResponse; the end is None."""
        try:
            while True:
                data, fds = await self.sock.recv()
                if fds:
                    zds.close_fds(fds)
                    raise zds.ZdsError("ztunnel sent fds")
                if not data:
                    break
                await self.acks.put(zds.decode_response(data))
        except (OSError, zds.ZdsError) as e:
            log.warning("ztunnel %s: %s; closing", self.peer, e)
        finally:
            self.closed.set()
            await self.acks.put(None)

    async def request(self, payload: zds.Request, fd: int | None = None) -> zds.Ack:
        """Send one request (``fd``: the netns of an add) and wait for its ack."""
        await self.sock.send(zds.encode_request(payload), (fd,) if fd is not None else ())
        return await self._ack(payload)

    async def _ack(self, payload: zds.Request) -> zds.Ack:
        """The ack of the oldest request still unanswered (ztunnel answers them in order)."""
        ack = await asyncio.wait_for(self.acks.get(), ACK_TIMEOUT_S)
        if ack is None:
            raise ConnectionError("ztunnel went away before its ack")
        if not ack.ok:
            log.warning("ztunnel %s refused %s: %s", self.peer, zds.describe(payload), ack.error)
        return ack

    async def requests(self, items: Iterable[tuple[zds.Request, int | None]],
                       window: int = SNAPSHOT_WINDOW) -> list[zds.Ack]:
        """Send each request, up to ``window`` of them ahead of their acks, and return every ack
        in order. Each fd is closed once its message is sent (the message holds the kernel's own
        reference to it); ``items`` is read lazily, so at most one fd is open here at a time.

        Why not :meth:`request` one by one (istio-cni's ``sendMsgAndWaitForAck``): ztunnel reads
        one message, handles it and acks it, then reads the next, so what it sees is the same;
        but a round trip per pod is two wake-ups per pod, and with 40 processes starting on two
        cores each wake-up waited for a CPU: a 50-pod snapshot took most of a second to cross."""
        pending: deque[zds.Request] = deque()
        acks = []
        for payload, fd in items:
            try:
                if len(pending) >= window:
                    acks.append(await self._ack(pending.popleft()))
                await self.sock.send(zds.encode_request(payload), (fd,) if fd is not None else ())
            finally:
                if fd is not None:
                    os.close(fd)
            pending.append(payload)
        while pending:
            acks.append(await self._ack(pending.popleft()))
        return acks


@dataclass
class NodeAgent:
    lab: str
    node: str
    pods: list[PodEntry]  # the cache: enrolled pods, in snapshot order
    known: dict[str, PodEntry]  # every application pod of the node, for run-time enrolment
    cookies: dict[str, int]
    files: StateDir
    conns: set[ZtunnelConn] = field(default_factory=set)
    _servers: list[socket.socket] = field(default_factory=list)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @classmethod
    def for_lab(cls, lab: str, node: str) -> NodeAgent:
        # what pods_of and plan.node read, and of the pods only this node's (a 1,000-pod plan
        # parsed and built whole took ~0.1 s of CPU in each of 20 node agents starting at once)
        plan = ledger.read_plan(lab, parts=("nodes", "pods"), where={"pods": lambda p: p.get("node") == node})
        plan.node(node)  # KeyError naming the nodes
        pods, known = pods_of(plan, node)
        return cls(lab, node, pods, known, ledger.netns_cookies(lab, {p.netns for p in known.values()}),
                   StateDir.of(lab))

    @property
    def ready_fields(self) -> dict[str, Any]:
        return {"app": "nodeagent", "name": f"istio-cni-{self.node}", "node": self.node,
                "zds": str(self.files.zds_socket(self.node)), "pods": [p.ref for p in self.pods]}

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def start(self) -> NodeAgent:
        root_dir(self.files.zds)
        for path, serve in ((self.files.zds_socket(self.node), self._serve_ztunnel),
                            (self.files.zds_control(self.node), self._serve_control)):
            lsock = listen_seqpacket(path)
            self._servers.append(lsock)
            self._spawn(self._accept(lsock, serve))
        return self

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in list(self.conns):
            c.sock.close()
        for s in self._servers:
            s.close()

    async def _accept(self, lsock: socket.socket, serve: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as e:
                log.warning("accept: %s", e)
                await asyncio.sleep(0.05)
                continue
            self._spawn(serve(conn))

    # ---- netns ------------------------------------------------------------------------------
    def open_netns(self, pod: PodEntry) -> int | None:
        """An fd of the pod's netns if it is the one the lab made (ledger cookie), else None."""
        want = self.cookies.get(pod.netns)
        if want is None:
            log.warning("%s: the ledger has no identity for netns %s", pod.ref, pod.netns)
            return None
        try:
            fd = os.open(ns.netns_path(pod.netns), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            log.warning("%s: cannot open netns %s: %s", pod.ref, pod.netns, e)
            return None
        if ns.fd_cookie(fd) != want:
            os.close(fd)
            log.warning("%s: netns %s is not the one the lab made; not handing it over", pod.ref, pod.netns)
            return None
        return fd

    async def _add(self, conn: ZtunnelConn, pod: PodEntry, snapshot: bool) -> zds.Ack:
        fd = self.open_netns(pod)
        if fd is None:
            if not snapshot:
                return zds.Ack(f"netns of {pod.ref} not available")
            return await conn.request(zds.KeepWorkload(pod.uid))
        try:
            return await conn.request(pod.add(), fd)
        finally:
            os.close(fd)  # (ztunnel has its own copy now)

    def _snapshot(self, pods: list[PodEntry]) -> Iterator[tuple[zds.Request, int | None]]:
        """The snapshot's requests (§3.1): an ``add`` with its netns fd per pod (``keep`` for a
        pod whose netns cannot be opened or vouched for), then ``snapshot_sent``; each netns is
        opened only when its turn comes."""
        for pod in pods:
            fd = self.open_netns(pod)
            yield (pod.add(), fd) if fd is not None else (zds.KeepWorkload(pod.uid), None)
        yield zds.SnapshotSent(), None

    # ---- ZDS server -------------------------------------------------------------------------
    async def _serve_ztunnel(self, raw: socket.socket) -> None:
        sock = zds.ZdsSocket(raw)
        conn = ZtunnelConn(sock, f"on {self.node}")
        try:
            data, fds = await asyncio.wait_for(sock.recv(), ACK_TIMEOUT_S)
            if fds:
                zds.close_fds(fds)
                raise zds.ZdsError("hello with fds")
            if not data:
                return
            hello = zds.ZdsHello.decode(data)
            if hello.version != istio.ZDS_VERSION_V1:
                raise zds.ZdsError(f"ZdsHello version {hello.version}, want V1")
            reader = asyncio.get_running_loop().create_task(conn.read_acks())
            async with conn.lock:
                await conn.requests(self._snapshot(list(self.pods)))
                self.conns.add(conn)
            log.info("ztunnel %s: snapshot of %d pods sent", conn.peer, len(self.pods))
            await reader
        except (OSError, TimeoutError, zds.ZdsError, ConnectionError) as e:
            log.warning("ztunnel %s: %s", conn.peer, e)
        finally:
            self.conns.discard(conn)
            sock.close()

    async def broadcast(self, make: Any) -> list[dict[str, Any]]:
        """``make(conn)`` (a request coroutine) on every connected ztunnel; their acks."""
        out = []
        for conn in list(self.conns):
            async with conn.lock:
                try:
                    ack = await make(conn)
                    out.append({"ztunnel": conn.peer, "error": ack.error})
                except (OSError, TimeoutError, ConnectionError) as e:
                    out.append({"ztunnel": conn.peer, "error": str(e) or type(e).__name__})
        return out

    async def enrol(self, ref: str) -> dict[str, Any]:
        pod = self.known.get(ref)
        if pod is None:
            return {"ok": False, "error": f"no application pod {ref!r} on node {self.node}"}
        if pod not in self.pods:
            self.pods.append(pod)
        acks = await self.broadcast(lambda c: self._add(c, pod, snapshot=False))
        return {"ok": all(not a["error"] for a in acks), "acks": acks}

    async def unenrol(self, ref: str) -> dict[str, Any]:
        pod = next((p for p in self.pods if p.ref == ref), None)
        if pod is None:
            return {"ok": False, "error": f"pod {ref!r} is not enrolled on node {self.node}"}
        self.pods.remove(pod)
        acks = await self.broadcast(lambda c: c.request(zds.DelWorkload(pod.uid)))
        return {"ok": all(not a["error"] for a in acks), "acks": acks}

    # ---- control socket ---------------------------------------------------------------------
    async def _serve_control(self, raw: socket.socket) -> None:
        sock = zds.ZdsSocket(raw)
        try:
            while True:
                data, fds = await sock.recv()
                zds.close_fds(fds)
                if not data:
                    return
                try:
                    req = json.loads(data[:CONTROL_MAX])
                    op = req.get("op") if isinstance(req, dict) else None
                    pod = req.get("pod") if isinstance(req, dict) else None
                    if op == "add" and isinstance(pod, str):
                        res = await self.enrol(pod)
                    elif op == "del" and isinstance(pod, str):
                        res = await self.unenrol(pod)
                    elif op == "list":
                        res = {"ok": True, "pods": [p.ref for p in self.pods], "ztunnels": len(self.conns)}
                    else:
                        res = {"ok": False, "error": 'want {"op": "add"|"del", "pod": "<ns>/<name>"} or {"op": "list"}'}
                except ValueError as e:
                    res = {"ok": False, "error": f"not JSON: {e}"}
                await sock.send(json.dumps(res).encode())
        except OSError as e:
            log.info("control: %s", e)
        finally:
            sock.close()


async def request(path: str | os.PathLike[str], req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to an agent's control socket and return its answer (for ``netlab``'s
    commands and tests)."""
    sock = await zds.ZdsSocket.connect(str(path))
    try:
        await sock.send(json.dumps(req).encode())
        data, fds = await asyncio.wait_for(sock.recv(), timeout)
        zds.close_fds(fds)
        res: dict[str, Any] = json.loads(data)
        return res
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--lab", required=True)
        p.add_argument("--node", required=True)

    async def start(args: argparse.Namespace, p: argparse.ArgumentParser) -> NodeAgent:
        try:
            agent = NodeAgent.for_lab(args.lab, args.node)
        except KeyError as e:
            p.error(str(e.args[0]))
        return await agent.start()

    return run_proxy(argv, prog="netlab.mesh.nodeagent", description=__doc__ or "", add_arguments=arguments,
                     start=start, log_name=lambda a: f"istio-cni[{a.node}]")
