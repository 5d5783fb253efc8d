"""Apply a plan: turn every value of a ``Plan`` into one kernel object, ledger first.

Two phases (a barrier between them), then files. A *pod* (leaf) netns is one that owns no
device and whose incoming veths have no ``master``; every other netns (fabric, nodes) is
*infrastructure*.

1. ``pods``, a pipeline (:meth:`_Applier._pods_pipeline`): ``workers - 1`` *makers* create
   pod namespaces (thread unshare + bind mount, :func:`ns.new_netns`), each with a netlink
   socket opened inside it and kept, write the pod's early sysctls, ipsets and iptables, and
   encode its ONE rtnetlink batch: ``lo`` up; its veth, sent from the pod's socket with the
   node end first (made straight in the node netns with a chosen ifindex, up) and the pod's
   end (the plan's peer end) second, then up; its addresses, routes and ip rules. ONE
   *batcher* first creates the infrastructure netns that
   other netns's devices land in (nodes: early ``conf.default.*`` sysctls and ``ip_forward``,
   which set what devices made later start with, then ``lo`` up) and their devices, then the
   devices of the fabric (which a maker creates before its pods), then sends each pod's
   batch through its socket, then the pod's sysctls that name its devices. Meanwhile the
   main thread builds the configure batches (it knows every chosen ifindex).
2. ``configure``: per infrastructure netns, one batch: bring up the veth ends other
   infrastructure netns put there, addresses, routes, ip rules; finish the kernel's linkwatch
   work on the newest pod veths (:meth:`_Applier._sync_pod_veths`); then sysctls, ipsets
   (+ entries), iptables chains and rules (one libiptc commit per table). Meanwhile the main
   thread writes ``plan.json``.
3. ``files`` (main thread). ``processes`` are not ours: the runtime starts them and records
   them with :func:`netlab.kernel.ledger.record_process`.

Measured costs that shaped this (2 vCPUs; bench-up has the totals): the kernel serialises
most of it on the rtnl mutex, and one thread that does nothing but send rtnetlink batches
keeps the mutex busy while the others make namespaces (2-10% faster than workers that each
make whole pods; see _pods_pipeline); that thread is the bottleneck, so it runs as little
Python as we can manage. A pod's veth comes up in its own batch, node end first, although
bringing all node ends up in one configure batch at the end was 4-5% faster: that left the
pods' ends waiting for linkwatch, and pods could not send for seconds after apply returned
(see _open_leaf). Moving the node's addresses and routes into the pods phase was slower.

Each worker enters its netns with :func:`ns.in_netns` (or creates it and stays), opens one
rtnetlink socket *there*, checks its netns cookie against the one recorded when the netns was
made, and sends each section as one batch. Every object is written to the ledger as an intent
before the request that creates it is sent. On any failure the whole lab is rolled back from the ledger (which is
exactly :func:`netlab.kernel.destroy.destroy`) and :class:`ApplyError` names the object.

Every object must live in a namespace the plan creates, so rollback and destroy never have to
undo single objects: deleting the namespace removes its devices, routes, rules, iptables and
ipsets at once, and nothing of the lab is ever in the root namespace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import struct
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netlab.errors import LabStateError
from netlab.kernel import ipt, rtnl
from netlab import netns as ns
from netlab.kernel.destroy import destroy, owner_of
from netlab.kernel.ledger import Ledger
from netlab.plan.types import (MAIN_TABLE, Address, File, IpSet, IpSetEntry, IptChain, IptRule, Link, Netns,
                               Plan, Route, Rule, Sysctl)

Progress = Callable[[str, int, int], None]


# The TAP's queue (txqueuelen) is also the ring between the kernel and the userspace Geneve relay;
# a burst of 1000 SYNs (scripts/soak) overflowed the default 1000 and cost retransmitted SYNs.
TAP_TXQLEN = 10000


# Far ends of veths (a pod's node side, a node's uplink) get chosen ifindexes from here up, so
# the configure phase needs no dump; devices a netns makes itself keep the kernel's low numbers.
FAR_END_IFINDEX = 1 << 16
# pods prepared by the makers and not yet sent by the batcher (each holds a netlink socket)
PIPE_DEPTH = 64
# pod veths per node whose linkwatch work apply finishes itself (see _sync_pod_veths)
LINKWATCH_TAIL = 32


@dataclass
class _PodItem:
    netns: Netns
    r: rtnl.Rtnl
    fd: int  # the pod's netns (its veth end lands there)
    datagrams: list[rtnl.Datagram]  # encoded by the maker; the batcher only sends them
    sysctls: list[Sysctl]
    far_ends: list[tuple[str, int]]  # (netns, ifindex) of its veths' other ends

    def close(self) -> None:
        self.r.close()
        os.close(self.fd)


class ApplyError(RuntimeError):
    """Apply failed and was rolled back; the message names the object that failed."""


class NetnsTakenError(LabStateError, ValueError):
    """A namespace name of the plan exists already (another lab's, or someone else's)."""


class _ObjError(Exception):
    def __init__(self, obj: Any, err: BaseException | str) -> None:
        super().__init__(f"{describe(obj)}: {_errstr(err)}")
        self.obj = obj


def _taken(err: OSError) -> OSError | str:
    """A netns name taken between validate() and its creation: by whom. (Its ledger record has
    our cookie, which the namespace there does not: destroy leaves it alone.)"""
    if not isinstance(err, FileExistsError) or not err.filename:
        return err
    owner = owner_of(os.path.basename(err.filename))
    return "the name was taken meanwhile " + (f"by lab {owner!r}" if owner else "by someone else")


def _errstr(err: BaseException | str) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)


def describe(o: Any) -> str:
    """A human name for a plan object, as used in error messages."""
    where = f" in netns {o.netns}" if hasattr(o, "netns") else ""
    if isinstance(o, Netns):
        return f"netns {o.name}"
    if isinstance(o, Link):
        if o.kind == "veth":
            return f"veth {o.name} (peer {o.peer_name} in netns {o.peer_netns}){where}"
        extra = f" id {o.vni} remote {o.remote}" if o.kind == "geneve" else ""
        return f"{o.kind} {o.name}{extra}{where}"
    if isinstance(o, Address):
        return f"address {o.ip}/{o.prefixlen} on {o.dev}{where}"
    if isinstance(o, Route):
        s = ("local " if o.type == "local" else "") + o.dst
        s += f" via {o.gateway}" if o.gateway else ""
        s += f" dev {o.dev}" if o.dev else ""
        s += f" table {o.table}" if o.table != MAIN_TABLE else ""
        s += f" scope {o.scope}" if o.scope != "universe" else ""
        s += f" src {o.src}" if o.src else ""
        s += " onlink" if o.onlink else ""
        return f"route {s}{where}"
    if isinstance(o, Rule):
        sel = f"fwmark {o.fwmark:#x}/{(o.fwmask if o.fwmask is not None else 0xFFFFFFFF):#x}" if o.fwmark is not None \
            else "from all"
        act = f"goto {o.goto}" if o.goto is not None else f"lookup {o.table}"
        return f"ip rule {o.priority}: {sel} {act}{where}"
    if isinstance(o, Sysctl):
        return f"sysctl {o.key_name}={o.value}{where}"
    if isinstance(o, IpSet):
        return f"ipset {o.name} ({o.type}){where}"
    if isinstance(o, IpSetEntry):
        return f"ipset entry {o.ip} in {o.set}{where}"
    if isinstance(o, IptChain):
        jump = f" (jump from {o.jump_from})" if o.jump_from else ""
        return f"iptables -t {o.table} -N {o.chain}{jump}{where}"
    if isinstance(o, IptRule):
        return f"iptables -t {o.table} -A {o.chain} {o.spec}{where}"
    if isinstance(o, File):
        return f"file {o.path}"
    return repr(o)


def validate(plan: Plan) -> None:
    """Refuse plans whose objects would live outside the lab's own, fresh namespaces."""
    names = [n.name for n in plan.netns]
    if len(set(names)) != len(names):
        raise ValueError(f"plan {plan.lab!r}: duplicate netns names")
    known = set(names)
    for n in names:
        if not n or "/" in n or n in (".", ".."):
            raise ValueError(f"plan {plan.lab!r}: invalid netns name {n!r}")
    taken = sorted(known & set(ns.list_netns()))
    if taken:
        owner = owner_of(taken[0])
        whose = f"made by lab {owner!r}" if owner else "not made by a netlab lab"
        raise NetnsTakenError(f"lab {plan.lab!r}: network namespace {taken[0]!r} already exists ({whose})"
                              + (f", and {len(taken) - 1} more of its names" if taken[1:] else "")
                              + "; choose another lab name (--name)")
    for o in plan.objects():
        if isinstance(o, Netns) or type(o).__name__ == "Process":
            continue
        if isinstance(o, File):
            if not os.path.isabs(o.path):
                raise ValueError(f"{describe(o)}: path must be absolute")
            continue
        if o.netns not in known:
            raise ValueError(f"{describe(o)}: netns {o.netns!r} is not created by the plan")
        if isinstance(o, Link) and o.kind == "veth" and (o.peer_netns not in known or not o.peer_name):
            raise ValueError(f"{describe(o)}: a veth needs peer_name and a peer_netns created by the plan")


def default_workers() -> int:
    """One pod maker per CPU, plus the batcher (see _pods_pipeline). Measured on 2 vCPUs,
    interleaved runs, ms per pod at 100 / 1000 pods: 2 workers 0.81 / 0.79, 3 workers
    0.77 / 0.74, 4 workers 0.78 / 0.79. (Before the pipeline, with whole pods per worker,
    more workers than CPUs only spun on the rtnl mutex.)"""
    return max(3, min(9, (os.cpu_count() or 2) + 1))


def apply(plan: Plan, *, progress: Progress | None = None, workers: int | None = None,
          keep_lock: bool = False) -> None:
    """Create every kernel object of ``plan``; on failure roll back and raise :class:`ApplyError`.

    ``keep_lock``: the lab stays locked by this process (destroy refuses it) after a good apply,
    until :func:`netlab.kernel.ledger.release_lock`: `up` keeps it while it starts the processes."""
    validate(plan)
    ledger = Ledger.create(plan)
    try:
        _Applier(plan, ledger, progress, workers or default_workers()).run()
        ledger.done(keep_lock=keep_lock)
    except BaseException as e:
        ledger.close()
        rb = ""
        try:
            rep = destroy(plan.lab)
            if rep.errors:
                rb = f" (rollback problems: {'; '.join(rep.errors)})"
        except Exception as e2:  # the original error matters more; say the rollback failed too
            rb = f" (rollback failed: {e2})"
        if not isinstance(e, Exception):
            raise
        msg = str(e) if isinstance(e, (_ObjError, ApplyError)) else f"lab {plan.lab}: {type(e).__name__}: {e}"
        raise ApplyError(msg + rb) from e
    finally:
        ledger.close()


# ---- the work ----

TUNSETIFF, TUNSETPERSIST = 0x400454CA, 0x400454CB
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


class _Applier:
    def __init__(self, plan: Plan, ledger: Ledger, progress: Progress | None, workers: int) -> None:
        self.plan = plan
        self.ledger = ledger
        self.progress = progress
        self.workers = max(1, workers)
        self.cookies: dict[str, int] = {}
        self._cookie_lock = threading.Lock()
        self._fds: dict[str, int] = {}
        # conf.default.* (and ip_forward) sysctls: written as soon as their netns exists, before
        # its devices: devices copy the defaults when they are made (see is_early_sysctl)
        self.early: dict[str, list[Sysctl]] = defaultdict(list)
        # ifindexes chosen for veth ends that other netns create here (netns -> device -> index)
        self._chosen: dict[str, dict[str, int]] = defaultdict(dict)
        self._pod_hosts: set[str] = set()  # netns with pod veths' far ends (nodes)
        # per node, the ifindexes of the pod veths' ends the batcher made there last (written by
        # the batcher alone, read after the pods phase)
        self._newest_ends: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=LINKWATCH_TAIL))
        self._pods_done = 0
        self._infra_made = threading.Event()  # the nodes exist: pod makers may open their fds
        self._stop = threading.Event()  # the pods phase failed somewhere: every thread stops
        self._prepped: dict[str, list[rtnl.Request]] = {}  # configure batches built ahead
        self._prepared = threading.Semaphore(0)  # configure tasks whose batch is built

    def run(self) -> None:
        try:
            self._run()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _run(self) -> None:
        self.root_cookie = ns.current_cookie()
        p = self.plan
        owners = {link.netns for link in p.links}
        into: dict[str, list[Link]] = defaultdict(list)
        for link in p.links:
            if link.kind == "veth" and link.peer_netns:
                into[link.peer_netns].append(link)
        # a leaf (a pod) owns no device; each veth into it is made from inside it, so one visit
        # to the pod's netns creates it, its veth and everything else in it
        leaves = {n.name for n in p.netns
                  if n.name not in owners and all(link.master is None for link in into.get(n.name, []))}
        work: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
        for section in ("addresses", "sysctls", "ipsets", "ipset_entries", "ipt_chains", "ipt_rules",
                        "routes", "rules"):
            for o in getattr(p, section):
                if section == "sysctls" and is_early_sysctl(o.key_name):
                    self.early[o.netns].append(o)
                else:
                    work[o.netns][section].append(o)

        inverted = {link.key for leaf in leaves for link in into.get(leaf, [])}

        def count(n: str) -> int:
            return sum(len(v) for v in work[n].values()) if n in work else 0

        # (at least 2: the pods phase runs a maker and the batcher at once, each waiting on the other)
        with ThreadPoolExecutor(max(2, self.workers), thread_name_prefix=f"apply-{p.lab}") as pool:
            infra = [n for n in p.netns if n.name not in leaves]
            by_owner: dict[str, list[Link]] = defaultdict(list)
            for link in p.links:
                if link.key not in inverted:
                    by_owner[link.netns].append(link)
            # every veth end that lands in an infrastructure netns from elsewhere gets an ifindex
            # chosen here, so the configure phase knows its devices without a dump
            for link in p.links:
                if link.key in inverted:
                    self._choose_index(link.netns, link.name)
                    self._pod_hosts.add(link.netns)
                elif link.kind == "veth" and link.peer_netns and link.peer_netns not in leaves and link.peer_name:
                    # (the kernel takes a veth's peer index only when the first end's is given too)
                    self._choose_index(link.netns, link.name)
                    self._choose_index(link.peer_netns, link.peer_name)
            # The netns other netns's devices land in (nodes) are made first, by the batcher; one
            # nobody's devices land in (the fabric) by a maker before its pods, its devices by the
            # batcher once it has made the nodes they reach.
            needed = {link.peer_netns for link in p.links if link.key not in inverted} | \
                     {link.netns for link in p.links if link.key in inverted}
            infra_tasks: list[tuple[Callable[[Any], None], Any]] = [(self._make_netns, [n]) for n in infra
                                                                     if n.name in needed]
            infra_tasks += [(self._make_links, (n, ls)) for n, ls in by_owner.items() if n in needed]
            loose = [n for n in infra if n.name not in needed]
            loose_links = [(self._make_links, (n.name, by_owner[n.name])) for n in loose if by_owner.get(n.name)]
            pods = [(n, into.get(n.name, []), work.get(n.name, {})) for n in p.netns if n.name in leaves]
            tasks = []
            for n in infra:
                ups = [(link, link.peer_name) for link in into.get(n.name, []) if link.key not in inverted]
                if ups or n.name in work or n.name in self._pod_hosts:
                    tasks.append((self._configure, (n.name, ups, work.get(n.name, {})), count(n.name)))
            # this thread is idle while the pods are made: it prepares the configure batches
            self._pods_pipeline(pool, infra_tasks, loose, loose_links, pods,
                                prepare=lambda: [self._prepare_configure(*t[1]) for t in tasks])
            self._phase(pool, "configure", tasks, sum(t[2] for t in tasks),
                        meanwhile=lambda: self._write_plan_when_prepared(len(tasks)))
        self._files()

    def _phase(self, pool: ThreadPoolExecutor, stage: str,
               tasks: Sequence[tuple[Callable[..., None], Any, int]], total: int,
               meanwhile: Callable[[], None] | None = None, poll: float | None = None,
               count: Callable[[], int] | None = None) -> None:
        """Run ``tasks`` on the pool; ``meanwhile`` runs on this (otherwise idle) thread."""
        done = 0
        if self.progress:
            self.progress(stage, 0, total)
        futs: dict[Future, int] = {pool.submit(fn, arg): n for fn, arg, n in tasks}
        pending = set(futs)
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                for f in pending:
                    f.cancel()
                wait(pending)
                raise
        while pending:
            finished, pending = wait(pending, timeout=poll, return_when=FIRST_EXCEPTION)
            if not finished:
                if self.progress and count is not None:
                    self.progress(stage, count(), total)
                continue
            for f in finished:
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()
                    wait(pending)
                    raise f.exception()  # type: ignore[misc]
                done += futs[f]
            if self.progress:
                self.progress(stage, count() if count is not None else done, total)

    # -- phase 1 --
    def _make_netns(self, group: list[Netns]) -> None:
        for n in group:
            with contextlib.ExitStack() as stack:
                socks: list[rtnl.Rtnl] = []

                def named(n: Netns = n, socks: list[rtnl.Rtnl] = socks, stack: Any = stack) -> None:
                    # inside the new netns, before it has a name: its identity first
                    socks.append(r := stack.enter_context(rtnl.Rtnl()))
                    if r.cookie == self.root_cookie:
                        raise _ObjError(n, "socket landed in the root netns; refusing to write")
                    self.ledger.named(n, r.cookie)

                try:
                    stack.enter_context(ns.new_netns(n.name, named))
                except OSError as e:
                    raise _ObjError(n, _taken(e)) from e
                r = socks[0]
                self._early_sysctls(n.name)
                try:
                    r.call(rtnl.link_set(1, up=True))
                except OSError as e:
                    raise _ObjError(n, f"lo up: {_errstr(e)}") from e
            with self._cookie_lock:
                self.cookies[n.name] = r.cookie

    def _sock(self, netns: str) -> rtnl.Rtnl:
        r = rtnl.Rtnl()
        try:
            r.assert_in(self.cookies[netns], f"netns {netns}")
        except BaseException:
            r.close()
            raise
        return r

    # -- phase 2 --
    def _make_links(self, arg: tuple[str, list[Link]]) -> None:
        netns, links = arg
        fds: dict[str, int] = {}
        try:
            with ns.in_netns(netns), self._sock(netns) as r:
                self.ledger.intent(links)
                plain: list[rtnl.Request] = []
                for link in links:
                    if link.kind == "tap":
                        self._make_tap(link)
                        plain.append(_tag(rtnl.link_set(name=link.name, up=True, mtu=link.mtu, mac=link.mac,
                                                        txqlen=TAP_TXQLEN), link))
                for link in links:
                    if link.kind == "tap" or link.master:
                        continue
                    plain.append(self._create_req(link, fds, None))
                self._check(r.batch(plain))
                enslaved = [link for link in links if link.master]
                if enslaved:
                    idx = r.link_indexes()
                    reqs = []
                    for link in enslaved:
                        if link.master not in idx:
                            raise _ObjError(link, f"no bridge {link.master!r} in netns {netns}")
                        if link.kind == "tap":
                            reqs.append(_tag(rtnl.link_set(idx[link.name], master=idx[link.master]), link))
                        else:
                            reqs.append(self._create_req(link, fds, idx[link.master]))
                    self._check(r.batch(reqs))
        finally:
            for fd in fds.values():
                os.close(fd)

    def _create_req(self, link: Link, fds: dict[str, int], master: int | None) -> rtnl.Request:
        peer_fd = None
        if link.kind == "veth":
            assert link.peer_netns
            if link.peer_netns not in fds:
                fds[link.peer_netns] = os.open(ns.netns_path(link.peer_netns), os.O_RDONLY | os.O_CLOEXEC)
            peer_fd = fds[link.peer_netns]
        req = rtnl.link_create(link.name, link.kind, up=True, mtu=link.mtu, mac=link.mac, peer_name=link.peer_name,
                               peer_netns_fd=peer_fd, vni=link.vni, remote=link.remote, master=master,
                               index=self._chosen.get(link.netns, {}).get(link.name, 0),
                               peer_index=self._chosen.get(link.peer_netns or "", {}).get(link.peer_name or "", 0))
        req.tag = link
        return req

    @staticmethod
    def _make_tap(link: Link) -> None:
        """A persistent TAP (like ``ip tuntap add mode tap``): the device lives in the netns of
        the thread that opens /dev/net/tun, and stays after we close it."""
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                ifr = struct.pack("16sH22x", link.name.encode(), IFF_TAP | IFF_NO_PI)
                fcntl.ioctl(fd, TUNSETIFF, ifr)
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
            finally:
                os.close(fd)
        except OSError as e:
            raise _ObjError(link, e) from e

    @staticmethod
    def _check(failures: list[tuple[rtnl.Request, rtnl.NetlinkError]]) -> None:
        if failures:
            req, err = failures[0]
            raise _ObjError(req.tag, err)

    # -- pods: a pipeline of makers (netns + socket + Python) and one batcher (rtnetlink) --
    def _pods_pipeline(self, pool: ThreadPoolExecutor, infra_tasks: list[tuple[Callable[[Any], None], Any]],
                       loose: list[Netns], loose_links: list[tuple[Callable[[Any], None], Any]],
                       pods: list[tuple[Netns, list[Link], dict[str, list[Any]]]],
                       prepare: Callable[[], Any] | None = None) -> None:
        """Make the infrastructure netns and devices, then every pod, in one phase.

        Why a pipeline: nearly all of a pod's kernel work beyond its netns runs under the rtnl
        mutex, and so does part of making a netns (registering its ``lo``, pernet notifiers).
        With every worker doing whole pods, two workers often wanted the mutex at once and one
        spun on it, or both made netns and the mutex sat idle. Here ``workers - 1`` *makers*
        create pod netns (each keeping a netlink socket opened inside it, so nobody has to visit
        it again) and do the pod's Python (ledger intents, requests, iptables), and ONE *batcher*
        sends each pod's prepared rtnetlink batch through that socket: the mutex is kept busy by
        one thread and the netns work overlaps it. The batcher first makes the infrastructure
        netns (nodes), which the pods' veths land in, while a maker makes the ``loose`` ones (the
        fabric) and then pods.

        The batcher is the bottleneck (with a maker per CPU), so the makers do its Python: they
        encode each pod's batch (``Rtnl.prepare``), and close the sockets it has used. Python
        work on another thread costs it too: it waits for the GIL each time it returns from the
        kernel (an interval of ``sys.setswitchinterval`` at worst).
        """
        # C-level queues: queue.Queue's Python-level locking showed up in the batcher's profile
        q: queue.SimpleQueue[_PodItem | None] = queue.SimpleQueue()
        # the batcher hands each sent pod's socket back for a maker to close: a close gives up
        # the GIL, and taking it back costs the batcher, the bottleneck, while a maker runs Python
        sent: queue.SimpleQueue[_PodItem] = queue.SimpleQueue()
        stop = self._stop
        todo = iter(pods)
        todo_lock = threading.Lock()
        makers = max(1, self.workers - 1)
        self._pods_done = 0
        loose_made = threading.Event()

        def close_sent() -> None:
            while True:
                try:
                    sent.get_nowait().close()
                except queue.Empty:
                    return

        def put(item: _PodItem | None) -> bool:
            # at most PIPE_DEPTH prepared pods (each holds a socket) wait for the batcher
            while q.qsize() >= PIPE_DEPTH and item is not None:
                if stop.is_set():
                    return False
                close_sent()
                time.sleep(0.0005)
            q.put(item)
            return True

        def maker(_: Any) -> None:
            try:
                with todo_lock:
                    mine, loose[:] = list(loose), []
                if mine:
                    self._make_netns(mine)
                    loose_made.set()
                while not stop.is_set():
                    with todo_lock:
                        pod = next(todo, None)
                    if pod is None:
                        break
                    close_sent()
                    item = self._open_leaf(*pod)
                    if item is None:
                        return
                    if not put(item):
                        item.close()
                        return
            except BaseException:
                stop.set()
                raise
            put(None)

        def batcher(_: Any) -> None:
            try:
                for fn, arg in infra_tasks:
                    fn(arg)
                self._infra_made.set()
                if loose_links:
                    while not loose_made.wait(0.05):
                        if stop.is_set():
                            return
                    for fn, arg in loose_links:
                        fn(arg)
                ended = 0
                while ended < makers and not stop.is_set():
                    try:
                        item = q.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    if item is None:
                        ended += 1
                        continue
                    try:
                        self._finish_leaf(item)
                    finally:
                        sent.put(item)
                    for netns, index in item.far_ends:
                        self._newest_ends[netns].append(index)
                    self._pods_done += 1
            except BaseException:
                stop.set()
                raise

        def meanwhile() -> None:
            try:
                if prepare is not None:
                    prepare()
            except BaseException:
                stop.set()  # the makers and the batcher stop at their next pod
                raise

        try:
            self._phase(pool, "pods", [(batcher, None, 0), *[(maker, None, 0)] * makers], len(pods),
                        meanwhile=meanwhile, poll=0.1, count=lambda: self._pods_done)
        finally:
            stop.set()
            while True:
                try:
                    left = q.get_nowait()
                except queue.Empty:
                    break
                if left is not None:
                    left.close()
            close_sent()

    def _open_leaf(self, n: Netns, inbound: list[Link], work: dict[str, list[Any]]) -> _PodItem | None:
        """Maker side: create the pod's netns with a netlink socket inside it; write what needs
        no device there (early sysctls, ipsets, iptables); prepare the rtnetlink requests."""
        r: rtnl.Rtnl | None = None

        def named() -> None:  # inside the new netns, before it has a name: its identity first
            nonlocal r
            r = rtnl.Rtnl()
            if r.cookie == self.root_cookie:
                raise _ObjError(n, "socket landed in the root netns; refusing to write")
            # one ledger write for the netns and all the pod's netlink objects (ahead of them)
            self.ledger.named(n, r.cookie, [*inbound, *work.get("addresses", ()), *work.get("routes", ()),
                                            *work.get("rules", ())])

        try:
            made = ns.new_netns(n.name, named)
            made.__enter__()
        except BaseException as e:
            if r is not None:
                r.close()
            if isinstance(e, OSError):
                raise _ObjError(n, _taken(e)) from e
            raise
        fd = -1
        try:
            assert r is not None
            with self._cookie_lock:
                self.cookies[n.name] = r.cookie
            fd = ns.own_netns_fd()
            self._early_sysctls(n.name)
            if work.get("ipsets") or work.get("ipset_entries"):
                self._ipsets(n.name, work.get("ipsets", []), work.get("ipset_entries", []))
            if work.get("ipt_chains") or work.get("ipt_rules"):
                self._iptables(n.name, work.get("ipt_chains", []), work.get("ipt_rules", []))
        except BaseException:
            if r is not None:
                r.close()
            if fd >= 0:
                os.close(fd)
            made.__exit__(None, None, None)
            raise
        made.__exit__(None, None, None)
        # ONE rtnetlink batch, encoded here and sent by the batcher through the pod's own socket:
        # ``lo`` up; its veth, node end first (made straight in the node netns with a chosen
        # ifindex, up), the pod's end (``eth0``) as its peer, then ``eth0`` up; its addresses,
        # routes and ip rules. A fresh netns holds only lo (ifindex 1); we give our veth ends
        # the next indexes ourselves, so addresses and routes go in the same batch, with no dump
        # in between.
        #
        # Why the node end comes up first: a veth end that comes up while its peer is up gets
        # its queue discipline at once; the end that was up first gets it from the kernel's
        # linkwatch, later. linkwatch handles 100-200 devices a run and, past its urgent runs,
        # one run a second: with the pod ends up first and 1000 node ends brought up at the end,
        # pods could not send for up to 8 s after apply returned. This way every pod can send
        # at once, and a node end linkwatch has not reached yet is finished by _sync_pod_veths.
        while not self._infra_made.wait(0.05):  # the veth's far end needs the node's fd
            if self._stop.is_set():  # the batcher failed; its error is the one to report
                r.close()
                os.close(fd)
                return None
        reqs = [_tag(rtnl.link_set(1, up=True), n)]
        idx = {"lo": 1}
        for link in inbound:
            idx[link.peer_name or "eth0"] = i = len(idx) + 1
            reqs.append(_tag(rtnl.link_create(link.name, "veth", up=True, mtu=link.mtu, mac=link.mac,
                                              netns_fd=self._netns_fd(link.netns),
                                              index=self._chosen[link.netns][link.name],
                                              peer_name=link.peer_name or "eth0", peer_netns_fd=fd, peer_index=i),
                              link))
            reqs.append(_tag(rtnl.link_set(i, up=True), link))
        reqs += self._netlink_reqs(work, idx)
        return _PodItem(n, r, fd, r.prepare(reqs), list(work.get("sysctls", ())),
                        [(link.netns, self._chosen[link.netns][link.name]) for link in inbound])

    def _finish_leaf(self, item: _PodItem) -> None:
        """Batcher side: send the pod's prepared batch; then the sysctls that need its devices."""
        for d in item.datagrams:
            self._check(item.r.send(d))
        if item.sysctls:
            with ns.in_netns(item.netns.name):
                for sc in item.sysctls:
                    self.ledger.intent([sc])
                    _write_sysctl(sc)

    def _choose_index(self, netns: str, dev: str) -> None:
        """Pick the ifindex of a device another netns will create in ``netns`` (a veth's far end)."""
        chosen = self._chosen[netns]
        chosen[dev] = FAR_END_IFINDEX + len(chosen)

    def _early_sysctls(self, netns: str) -> None:
        """The netns's early sysctls (is_early_sysctl), from a thread inside it, before any device."""
        if self.early.get(netns):
            self.ledger.intent(self.early[netns])
            for s in self.early[netns]:
                _write_sysctl(s)

    def _netns_fd(self, name: str) -> int:
        """An fd for infrastructure netns ``name``, opened once per apply (every pod's veth
        sends its far end there)."""
        fd = self._fds.get(name)
        if fd is None:
            with self._cookie_lock:
                fd = self._fds.get(name)
                if fd is None:
                    fd = self._fds[name] = os.open(ns.netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        return fd

    # -- configure: the rest of each infrastructure netns --
    def _write_plan_when_prepared(self, tasks: int) -> None:
        """``plan.json``, once every configure task has its batch ready (or after a second).

        Why wait: encoding the plan holds the GIL (34 ms at 1000 pods); written while the
        configure tasks build their requests it stalls them, written while their batch is in
        the kernel it costs nothing. destroy needs only the ledger, so nothing waits for it.
        """
        for _ in range(tasks):
            if not self._prepared.acquire(timeout=1.0):
                break
        self.ledger.write_plan(self.plan)

    def _configure(self, arg: tuple[str, list[tuple[Link, str]], dict[str, list[Any]]]) -> None:
        """Everything but links in an infrastructure netns, through one socket there.

        One rtnetlink batch carries, in order, the veth ends other netns created here (``ups``:
        link, device name) brought up, addresses, routes, ip rules. Then sysctls, ipsets and
        iptables. Nothing in the kernel orders routes after iptables, and one batch saves a
        round trip per section (a node has 1000s of pods). Device indexes come from the ones
        chosen for veth far ends; a dump only when the work names a device made here.
        """
        netns, ups, work = arg
        prepared = False
        try:
            with ns.in_netns(netns), self._sock(netns) as r:
                reqs = self._prepped.pop(netns, None)
                if reqs is None:  # the work names a device made here (bridge, tap, geneve)
                    reqs = self._configure_batch(ups, work, r.link_indexes())
                self._prepared.release()
                prepared = True
                if reqs:
                    self._check(r.batch(reqs))
                self._sync_pod_veths(netns, r)
                self._configure_rest(netns, work)
        finally:
            if not prepared:
                self._prepared.release()

    def _sync_pod_veths(self, netns: str, r: rtnl.Rtnl) -> None:
        """Finish the kernel's linkwatch work on the node ends of the last LINKWATCH_TAIL pod
        veths made into ``netns`` (see _open_leaf): an RTM_GETLINK of each runs it at once if
        it is still pending. Without this, traffic to those pods would be dropped until
        linkwatch comes round. Every pod's carrier-on schedules an immediate linkwatch run
        that takes up to 200 devices, oldest first, so only the newest can still be waiting
        (none was, in runs of 100 and 1000 pods; a dump of 1000 devices to check costs 15 ms)."""
        ends = self._newest_ends.get(netns)
        if ends:
            self._check(r.batch([_tag(rtnl.link_get(i), netns) for i in ends]))

    def _prepare_configure(self, netns: str, ups: list[tuple[Link, str]], work: dict[str, list[Any]]) -> None:
        """Write the intents and build the batch of a configure task ahead of time, if every
        device its work names has a chosen ifindex (else the task dumps the netns's devices)."""
        idx = self._chosen.get(netns, {})
        if any(o.dev and o.dev not in idx for sec in ("addresses", "routes") for o in work.get(sec, ())):
            return
        self._prepped[netns] = self._configure_batch(ups, work, idx)

    def _configure_batch(self, ups: list[tuple[Link, str]], work: dict[str, list[Any]],
                         idx: dict[str, int]) -> list[rtnl.Request]:
        """Intents, then the batch: ``ups`` brought up, addresses, routes, ip rules."""
        self.ledger.intent([*work.get("addresses", []), *work.get("routes", []), *work.get("rules", [])])
        reqs = [_tag(rtnl.link_set(name=dev, up=True), link) for link, dev in ups]
        return reqs + self._netlink_reqs(work, idx)

    def _configure_rest(self, netns: str, work: dict[str, list[Any]]) -> None:
        """Sysctls, ipsets and iptables of ``netns``, from a thread inside it."""
        for s in work.get("sysctls", []):
            self.ledger.intent([s])
            _write_sysctl(s)

        if work.get("ipsets") or work.get("ipset_entries"):
            self._ipsets(netns, work.get("ipsets", []), work.get("ipset_entries", []))

        if work.get("ipt_chains") or work.get("ipt_rules"):
            self._iptables(netns, work.get("ipt_chains", []), work.get("ipt_rules", []))

    @staticmethod
    def _netlink_reqs(work: dict[str, list[Any]], idx: dict[str, int]) -> list[rtnl.Request]:
        """The rtnetlink requests for ``work``'s addresses, routes and ip rules, in that order."""
        def index(o: Any, dev: str | None) -> int | None:
            if dev is None:
                return None
            if dev not in idx:
                raise _ObjError(o, f"no device {dev!r}")
            return idx[dev]

        reqs = [_tag(rtnl.addr_add(index(a, a.dev), a.ip, a.prefixlen), a) for a in work.get("addresses", ())]
        reqs += [_tag(rtnl.route_add(o.dst, oif=index(o, o.dev), gateway=o.gateway, table=o.table, scope=o.scope,
                                     src=o.src, onlink=o.onlink, type=o.type), o) for o in work.get("routes", ())]
        reqs += [_tag(rtnl.rule_add(o.priority, table=o.table, fwmark=o.fwmark, fwmask=o.fwmask, goto=o.goto), o)
                 for o in work.get("rules", ())]
        return reqs

    def _ipsets(self, netns: str, sets: list[IpSet], entries: list[IpSetEntry]) -> None:
        from pyroute2 import IPSet as NlIPSet

        ips = NlIPSet()  # its setup runs in this thread, so the socket is in this netns: check it
        try:
            ns.assert_socket_in(ips.asyncore.socket.fileno(), self.cookies[netns], f"ipset socket in netns {netns}")
            for s in sets:
                self.ledger.intent([s])
                try:
                    ips.create(s.name, stype=s.type, comment=s.comment)
                except Exception as e:
                    raise _ObjError(s, e) from e
            self.ledger.intent(entries)
            for e in entries:
                try:
                    ips.add(e.set, e.ip, comment=e.comment)
                except Exception as ex:
                    raise _ObjError(e, ex) from ex
        finally:
            ips.close()

    def _iptables(self, netns: str, chains: list[IptChain], rules: list[IptRule]) -> None:
        tables: dict[str, tuple[list[IptChain], list[IptRule]]] = {}
        for c in chains:
            tables.setdefault(c.table, ([], []))[0].append(c)
        for rl in rules:
            tables.setdefault(rl.table, ([], []))[1].append(rl)
        for table, (cs, rs) in tables.items():
            self.ledger.intent([*cs, *rs])
            with ipt.locked():
                try:
                    self._ipt_table(netns, table, cs, rs, commit_each=False)
                except (_ObjError, ns.NetnsError):
                    raise
                except Exception as e:
                    # the kernel refused the table as a whole at commit: redo it one commit per
                    # object to name the one it rejects (the netns is ours: partial state is fine)
                    self._ipt_table(netns, table, cs, rs, commit_each=True)
                    raise ApplyError(f"iptables -t {table} in netns {netns}: commit failed: {e}") from e

    def _ipt_table(self, netns: str, table: str, cs: list[IptChain], rs: list[IptRule], *, commit_each: bool) -> None:
        """All chains (+ their jumps) then all rules of one table, in plan order, in one commit
        (or, when hunting a commit failure, one commit each)."""
        where = f"in netns {netns}"
        tx = ipt.TableTx(table, self.cookies[netns], where)
        try:
            for obj in [*cs, *rs]:
                try:
                    if isinstance(obj, IptChain):
                        tx.create_chain(obj.chain)
                        if obj.jump_from:
                            tx.insert_jump(obj.jump_from, obj.chain)
                    else:
                        tx.append(obj.chain, obj.spec)
                except Exception as e:
                    raise _ObjError(obj, e) from e
                if commit_each:
                    try:
                        tx.commit()
                    except ns.NetnsError:
                        raise
                    except Exception as e:
                        raise _ObjError(obj, e) from e
                    tx.close()
                    tx = ipt.TableTx(table, self.cookies[netns], where)
            if not commit_each:
                tx.commit()
        finally:
            tx.close()

    # -- phase 4 --
    def _files(self) -> None:
        files = self.plan.files
        if self.progress and files:
            self.progress("files", 0, len(files))
        for i, f in enumerate(files):
            try:
                for d in _missing_parents(Path(f.path)):
                    os.mkdir(d, 0o755)  # FileExistsError: made meanwhile by someone else: not ours
                    st = os.lstat(d)
                    self.ledger.mkdir(str(d), st.st_dev, st.st_ino)
                _write_new_file(f, self.ledger)
            except OSError as e:
                raise _ObjError(f, e) from e
            if self.progress:
                self.progress("files", i + 1, len(files))


def _write_new_file(f: File, ledger: Ledger) -> None:
    """Make ``f.path`` with its content, refusing a path that exists (someone else's, or a
    symlink planted there). The file is made unnamed (O_TMPFILE) and recorded with its identity
    before it is linked to its name, so destroy can tell it from whatever else takes that name;
    it also never shows half-written. Where the filesystem has no O_TMPFILE it is created under
    its name (O_EXCL) and recorded right after (a kill in between leaves a file destroy does
    not claim)."""
    data = f.content.encode()
    parent = os.path.dirname(f.path)
    try:
        fd = os.open(parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            st = os.fstat(fd)
            ledger.file(f, st.st_dev, st.st_ino)
            os.write(fd, data)
        finally:
            os.close(fd)
        return
    try:
        os.fchmod(fd, 0o644)  # (the umask applied to the mode above)
        os.write(fd, data)
        st = os.fstat(fd)
        ledger.file(f, st.st_dev, st.st_ino)
        # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/<fd>: EEXIST if the name is taken, symlink
        # or not (os.link without a dir fd would call link(), which links the magic link itself)
        proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(str(fd), f.path, src_dir_fd=proc_fd)
        finally:
            os.close(proc_fd)
    finally:
        os.close(fd)


def _tag(req: rtnl.Request, obj: Any) -> rtnl.Request:
    req.tag = obj
    return req


def _missing_parents(path: Path) -> list[Path]:
    out = []
    d = path.parent
    while not d.exists():
        out.append(d)
        d = d.parent
    return list(reversed(out))


def is_early_sysctl(key: str) -> bool:
    """A sysctl that sets what devices made later start with, so it is written when its netns
    is new: ``net.ipv{4,6}.conf.default.*``, and ``net.ipv4.ip_forward`` (it sets ``all`` and
    ``default``; written late, it walks every device already there, 1000s on a node)."""
    parts = key.split(".")
    if key == "net.ipv4.ip_forward":
        return True
    return len(parts) == 5 and parts[0] == "net" and parts[2] == "conf" and parts[3] == "default"


def sysctl_path(key: str) -> str:
    """``net.ipv4.conf.eth0.rp_filter`` -> ``/proc/sys/net/ipv4/conf/eth0/rp_filter`` (device
    names may contain dots, so only the fixed parts are split)."""
    parts = key.split(".")
    if len(parts) >= 5 and parts[0] == "net" and parts[2] in ("conf", "neigh"):
        return "/proc/sys/" + "/".join(parts[:3] + [".".join(parts[3:-1]), parts[-1]])
    return "/proc/sys/" + "/".join(parts)


def _write_sysctl(s: Sysctl) -> None:
    """Written from the calling thread, which is inside ``s.netns``: /proc/sys/net resolves to
    the netns of the task (thread) that opens it."""
    if not s.key_name.startswith("net."):
        raise _ObjError(s, "only net.* sysctls are per-namespace; refusing to write a host-wide setting")
    try:
        with open(sysctl_path(s.key_name), "w") as f:
            f.write(s.value)
    except FileNotFoundError as e:
        if not s.optional:
            raise _ObjError(s, e) from e
    except OSError as e:
        raise _ObjError(s, e) from e

