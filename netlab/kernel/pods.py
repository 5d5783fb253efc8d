"""Apply's pods phase: the infrastructure netns and their devices, then every pod, as a pipeline
of pod *makers* and one *batcher* (see :meth:`PodsPhase._pods_pipeline` for why).

A pod is made in one visit to its netns (:class:`netlab.plan.layout.PodLayout`): the maker
creates the netns with a netlink socket inside it and writes what needs no device (early
sysctls, ipsets, iptables); the batcher sends the pod's one prepared rtnetlink batch through that
socket (``lo`` up, its veth node end first, addresses, routes, ip rules), then the sysctls that
name its devices.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from netlab import netns as ns
from netlab.kernel import rtnl
from netlab.kernel.applier import ApplierBase, netlink_requests, taken
from netlab.kernel.failures import ObjectError, check, tag
from netlab.kernel.netfilter import write_ipsets, write_iptables
from netlab.kernel.sysctl import write_sysctl
from netlab.plan.layout import PodLayout
from netlab.plan.types import Netns, Sysctl

# pods prepared by the makers and not yet sent by the batcher (each holds a netlink socket)
PIPE_DEPTH = 64


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


class PodsPhase(ApplierBase):
    def _pods_pipeline(self, pool: ThreadPoolExecutor, prepare: Callable[[], object] | None = None) -> None:
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
        lay = self.layout
        infra_tasks: list[tuple[Callable[[Any], None], Any]] = [(self._make_netns, [n]) for n in lay.hubs]
        infra_tasks += [(self._make_links, x) for x in lay.hub_links]
        loose = list(lay.loose)  # (taken by the first maker)
        loose_links = [(self._make_links, x) for x in lay.loose_links]
        stop = self._stop
        todo = iter(lay.pods)
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
                    item = self._open_leaf(pod)
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
            self._phase(pool, "pods", [(batcher, None, 0), *[(maker, None, 0)] * makers], len(lay.pods),
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

    def _open_leaf(self, pod: PodLayout) -> _PodItem | None:
        """Maker side: create the pod's netns with a netlink socket inside it; write what needs
        no device there (early sysctls, ipsets, iptables); prepare the rtnetlink requests."""
        n, inbound, work = pod.netns, pod.inbound, pod.work
        r: rtnl.Rtnl | None = None

        def named() -> None:  # inside the new netns, before it has a name: its identity first
            nonlocal r
            r = rtnl.Rtnl()
            if r.cookie == self.root_cookie:
                raise ObjectError(n, "socket landed in the root netns; refusing to write")
            # one ledger write for the netns and all the pod's netlink objects (ahead of them)
            self.ledger.named(n, r.cookie, [*inbound, *work.addresses, *work.routes, *work.rules])

        try:
            made = ns.new_netns(n.name, named)
            made.__enter__()
        except BaseException as e:
            if r is not None:
                r.close()
            if isinstance(e, OSError):
                raise ObjectError(n, taken(e)) from e
            raise
        fd = -1
        try:
            assert r is not None
            with self._cookie_lock:
                self.cookies[n.name] = r.cookie
            fd = ns.own_netns_fd()
            self._early_sysctls(n.name)
            if work.ipsets or work.ipset_entries:
                write_ipsets(n.name, r.cookie, work.ipsets, work.ipset_entries, self.ledger)
            if work.ipt_chains or work.ipt_rules:
                write_iptables(n.name, r.cookie, work.ipt_chains, work.ipt_rules, self.ledger)
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
        reqs = [tag(rtnl.link_set(1, up=True), n)]
        idx = {"lo": 1}
        for link in inbound:
            idx[link.peer_name or "eth0"] = i = len(idx) + 1
            reqs.append(tag(rtnl.link_create(link.name, "veth", up=True, mtu=link.mtu, mac=link.mac,
                                              netns_fd=self._netns_fd(link.netns),
                                              index=self._chosen[link.netns][link.name],
                                              peer_name=link.peer_name or "eth0", peer_netns_fd=fd, peer_index=i),
                              link))
            reqs.append(tag(rtnl.link_set(i, up=True), link))
        reqs += netlink_requests(work, idx)
        return _PodItem(n, r, fd, r.prepare(reqs), work.sysctls,
                        [(link.netns, self._chosen[link.netns][link.name]) for link in inbound])

    def _finish_leaf(self, item: _PodItem) -> None:
        """Batcher side: send the pod's prepared batch; then the sysctls that need its devices."""
        for d in item.datagrams:
            check(item.r.send(d))
        if item.sysctls:
            with ns.in_netns(item.netns.name):
                for sc in item.sysctls:
                    self.ledger.intent([sc])
                    write_sysctl(sc)
