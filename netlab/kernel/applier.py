"""The state one apply shares between its phases, and the steps every phase uses: running a
phase's tasks on the pool, making an infrastructure netns and its devices, entering a netns
through a socket checked against the recorded cookie.

Split from :mod:`netlab.kernel.apply` along its phases: :mod:`netlab.kernel.pods` (the pods
pipeline) and :mod:`netlab.kernel.configure` (the configure phase) build on :class:`ApplierBase`;
``apply._Applier`` joins them and runs them in order.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

from netlab import netns as ns
from netlab.kernel import rtnl
from netlab.kernel.destroy import owner_of
from netlab.kernel.failures import ObjectError, check, errstr, tag
from netlab.kernel.ledger import Ledger
from netlab.kernel.sysctl import write_sysctl
from netlab.plan.layout import Layout, NetnsWork
from netlab.plan.types import Link, Netns, Plan

Progress = Callable[[str, int, int], None]

# The TAP's queue (txqueuelen) is also the ring between the kernel and the userspace Geneve relay;
# a burst of 1000 SYNs (scripts/soak) overflowed the default 1000 and cost retransmitted SYNs.
TAP_TXQLEN = 10000
# Far ends of veths (a pod's node side, a node's uplink) get chosen ifindexes from here up, so
# the configure phase needs no dump; devices a netns makes itself keep the kernel's low numbers.
FAR_END_IFINDEX = 1 << 16
# pod veths per node whose linkwatch work apply finishes itself (see ConfigurePhase._sync_pod_veths)
LINKWATCH_TAIL = 32

TUNSETIFF, TUNSETPERSIST = 0x400454CA, 0x400454CB
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def taken(err: OSError) -> OSError | str:
    """A netns name taken between validate() and its creation: by whom. (Its ledger record has
    our cookie, which the namespace there does not: destroy leaves it alone.)"""
    if not isinstance(err, FileExistsError) or not err.filename:
        return err
    owner = owner_of(os.path.basename(err.filename))
    return "the name was taken meanwhile " + (f"by lab {owner!r}" if owner else "by someone else")


def netlink_requests(work: NetnsWork, idx: dict[str, int]) -> list[rtnl.Request]:
    """The rtnetlink requests for ``work``'s addresses, routes and ip rules, in that order;
    ``idx``: the netns's device indexes (chosen or dumped)."""
    def index(o: object, dev: str) -> int:
        if dev not in idx:
            raise ObjectError(o, f"no device {dev!r}")
        return idx[dev]

    reqs = [tag(rtnl.addr_add(index(a, a.dev), a.ip, a.prefixlen), a) for a in work.addresses]
    reqs += [tag(rtnl.route_add(o.dst, oif=None if o.dev is None else index(o, o.dev), gateway=o.gateway,
                                table=o.table, scope=o.scope, src=o.src, onlink=o.onlink, type=o.type), o)
             for o in work.routes]
    reqs += [tag(rtnl.rule_add(o.priority, table=o.table, fwmark=o.fwmark, fwmask=o.fwmask, goto=o.goto), o)
             for o in work.rules]
    return reqs


class ApplierBase:
    """One apply of ``plan`` laid out as ``layout``, recorded in ``ledger``."""

    def __init__(self, plan: Plan, layout: Layout, ledger: Ledger, progress: Progress | None, workers: int) -> None:
        self.plan = plan
        self.layout = layout
        self.ledger = ledger
        self.progress = progress
        self.workers = max(1, workers)
        self.root_cookie = 0
        self.cookies: dict[str, int] = {}
        self._cookie_lock = threading.Lock()
        self._fds: dict[str, int] = {}
        # ifindexes chosen for veth ends that other netns create here (netns -> device -> index)
        self._chosen: dict[str, dict[str, int]] = defaultdict(dict)
        # per node, the ifindexes of the pod veths' ends the batcher made there last (written by
        # the batcher alone, read after the pods phase)
        self._newest_ends: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=LINKWATCH_TAIL))
        self._pods_done = 0
        self._infra_made = threading.Event()  # the nodes exist: pod makers may open their fds
        self._stop = threading.Event()  # the pods phase failed somewhere: every thread stops
        self._prepped: dict[str, list[rtnl.Request]] = {}  # configure batches built ahead
        self._prepared = threading.Semaphore(0)  # configure tasks whose batch is built

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _phase(self, pool: ThreadPoolExecutor, stage: str,
               tasks: Sequence[tuple[Callable[[Any], None], Any, int]], total: int,
               meanwhile: Callable[[], None] | None = None, poll: float | None = None,
               count: Callable[[], int] | None = None) -> None:
        """Run ``tasks`` on the pool; ``meanwhile`` runs on this (otherwise idle) thread."""
        done = 0
        if self.progress:
            self.progress(stage, 0, total)
        futs: dict[Future[None], int] = {pool.submit(fn, arg): n for fn, arg, n in tasks}
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
                    raise f.exception()  # type: ignore[misc]  # (an exception: checked above)
                done += futs[f]
            if self.progress:
                self.progress(stage, count() if count is not None else done, total)

    def _make_netns(self, group: list[Netns]) -> None:
        for n in group:
            with contextlib.ExitStack() as stack:
                socks: list[rtnl.Rtnl] = []

                def named(n: Netns = n, socks: list[rtnl.Rtnl] = socks, stack: Any = stack) -> None:
                    # inside the new netns, before it has a name: its identity first
                    socks.append(r := stack.enter_context(rtnl.Rtnl()))
                    if r.cookie == self.root_cookie:
                        raise ObjectError(n, "socket landed in the root netns; refusing to write")
                    self.ledger.named(n, r.cookie)

                try:
                    stack.enter_context(ns.new_netns(n.name, named))
                except OSError as e:
                    raise ObjectError(n, taken(e)) from e
                r = socks[0]
                self._early_sysctls(n.name)
                try:
                    r.call(rtnl.link_set(1, up=True))
                except OSError as e:
                    raise ObjectError(n, f"lo up: {errstr(e)}") from e
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
                        plain.append(tag(rtnl.link_set(name=link.name, up=True, mtu=link.mtu, mac=link.mac,
                                                        txqlen=TAP_TXQLEN), link))
                for link in links:
                    if link.kind == "tap" or link.master:
                        continue
                    plain.append(self._create_req(link, fds, None))
                check(r.batch(plain))
                enslaved = [link for link in links if link.master]
                if enslaved:
                    idx = r.link_indexes()
                    reqs = []
                    for link in enslaved:
                        if link.master not in idx:
                            raise ObjectError(link, f"no bridge {link.master!r} in netns {netns}")
                        if link.kind == "tap":
                            reqs.append(tag(rtnl.link_set(idx[link.name], master=idx[link.master]), link))
                        else:
                            reqs.append(self._create_req(link, fds, idx[link.master]))
                    check(r.batch(reqs))
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
            raise ObjectError(link, e) from e

    def _choose_index(self, netns: str, dev: str) -> None:
        """Pick the ifindex of a device another netns will create in ``netns`` (a veth's far end)."""
        chosen = self._chosen[netns]
        chosen[dev] = FAR_END_IFINDEX + len(chosen)

    def _early_sysctls(self, netns: str) -> None:
        """The netns's early sysctls (is_early_sysctl), from a thread inside it, before any device."""
        early = self.layout.early.get(netns)
        if early:
            self.ledger.intent(early)
            for s in early:
                write_sysctl(s)

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
