"""Apply a plan: turn every value of a ``Plan`` into one kernel object, ledger first.

Phases (each a barrier; inside a phase, work is grouped per netns on a small thread pool).
A *pod* (leaf) netns is one that owns no device and whose incoming veths have no ``master``;
every other netns (fabric, nodes) is *infrastructure*.

1. ``netns``: create each infrastructure namespace that another netns's devices land in
   (thread unshare + bind mount), write its ``conf.default.*`` sysctls and ``ip_forward``
   (they set what devices made later start with), ``lo`` up. Pods do the same in phase 2.
2. ``pods``: (a) per infrastructure netns, create the devices it owns (a veth's peer is made
   directly in its ``peer_netns``); an infrastructure netns nobody's devices land in (the
   fabric) is created here, by the same task; (b) per pod, ONE visit: create the netns and
   stay in it (:func:`ns.new_netns`), then ONE rtnetlink batch: ``lo`` up, its veth made
   from the pod side (the plan's peer end, up, with a known ifindex; the node end sent
   straight into the node netns), its addresses, routes and ip rules; then its sysctls,
   ipsets and iptables. A visit to a netns (setns + socket) costs ~0.05 ms, so pods get one.
3. ``configure``: per infrastructure netns, one batch: bring up the veth ends other workers
   put there, addresses, routes, ip rules; then sysctls, ipsets (+ entries), iptables chains
   and rules (one libiptc commit per table).
4. ``files`` (main thread). ``processes`` are not ours: the runtime starts them and records
   them with :func:`netlab.kernel.ledger.record_process`.

Measured costs that shaped this (2 vCPUs, 1000 pods; bench-up has the totals): the kernel
serialises nearly all of it on the rtnl mutex, so more threads than CPUs only spin; a node's
veth ends are brought up in ONE batch because each carrier-on is a linkwatch run, and 1000
separate runs cost more than the batch; moving the node side into the pod tasks was slower.

Each worker enters its netns with :func:`ns.in_netns`, opens one rtnetlink socket *there*,
checks its netns cookie against the one recorded when the netns was made, and sends each
section as one batch. Every object is written to the ledger as an intent before the request
that creates it is sent. On any failure the whole lab is rolled back from the ledger (which is
exactly :func:`netlab.kernel.destroy.destroy`) and :class:`ApplyError` names the object.

Every object must live in a namespace the plan creates, so rollback and destroy never have to
undo single objects: deleting the namespace removes its devices, routes, rules, iptables and
ipsets at once, and nothing of the lab is ever in the root namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from netlab.kernel import ipt, ns, rtnl
from netlab.kernel.destroy import destroy
from netlab.kernel.ledger import Ledger
from netlab.plan.types import (MAIN_TABLE, Address, File, IpSet, IpSetEntry, IptChain, IptRule, Link, Netns,
                               Plan, Route, Rule, Sysctl)

Progress = Callable[[str, int, int], None]


# The TAP's queue (txqueuelen) is also the ring between the kernel and the userspace Geneve relay;
# a burst of 1000 SYNs (scripts/soak) overflowed the default 1000 and cost retransmitted SYNs.
TAP_TXQLEN = 10000


class ApplyError(RuntimeError):
    """Apply failed and was rolled back; the message names the object that failed."""


class _ObjError(Exception):
    def __init__(self, obj: Any, err: BaseException | str) -> None:
        super().__init__(f"{describe(obj)}: {_errstr(err)}")
        self.obj = obj


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
    taken = known & set(ns.list_netns())
    if taken:
        raise ValueError(f"plan {plan.lab!r}: netns already exist: {', '.join(sorted(taken))}")
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
    """One worker per CPU: the kernel work is CPU-bound and serialised on the rtnl mutex and the
    /run/netns directory lock, and extra threads only spin on those (measured on 2 vCPUs, 1000
    pods: 2 workers 1.38 ms/pod, 4 workers 1.59, 8 workers 1.55)."""
    return max(2, min(8, os.cpu_count() or 2))


def apply(plan: Plan, *, progress: Progress | None = None, workers: int | None = None) -> None:
    """Create every kernel object of ``plan``; on failure roll back and raise :class:`ApplyError`."""
    validate(plan)
    ledger = Ledger.create(plan)
    try:
        _Applier(plan, ledger, progress, workers or default_workers()).run()
        ledger.done()
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

        with ThreadPoolExecutor(self.workers, thread_name_prefix=f"apply-{p.lab}") as pool:
            infra = [n for n in p.netns if n.name not in leaves]
            by_owner: dict[str, list[Link]] = defaultdict(list)
            for link in p.links:
                if link.key not in inverted:
                    by_owner[link.netns].append(link)
            # A netns no other netns's device lands in (the fabric) is needed by nobody before
            # the configure phase: it is made, with its devices, by a pods-phase task, so pods
            # do not wait for it.
            needed = {link.peer_netns for link in p.links if link.key not in inverted} | \
                     {link.netns for link in p.links if link.key in inverted}
            first = [n for n in infra if n.name in needed]
            chunk = max(1, min(64, len(first) // (self.workers * 4) or 1))
            groups = [first[i:i + chunk] for i in range(0, len(first), chunk)]
            self._phase(pool, "netns", [(self._make_netns, g, len(g)) for g in groups], len(first))

            tasks = [(self._make_netns_links, (n, by_owner.get(n.name, [])), 1 + len(by_owner.get(n.name, [])))
                     for n in infra if n.name not in needed]
            tasks += [(self._make_links, (n, ls), len(ls)) for n, ls in by_owner.items() if n in needed]
            pods = [(n, into.get(n.name, []), work.get(n.name, {})) for n in p.netns if n.name in leaves]
            # a few pods per task: one future (and one wake-up of the main thread) per pod costs
            # more Python than the pod's own netlink messages
            per = max(1, min(16, len(pods) // (self.workers * 8) or 1))
            tasks += [(self._leaves, pods[i:i + per], sum(1 + count(x[0].name) for x in pods[i:i + per]))
                      for i in range(0, len(pods), per)]
            self._phase(pool, "pods", tasks, sum(t[2] for t in tasks),
                        meanwhile=lambda: self.ledger.write_plan(p))

            tasks = []
            for n in infra:
                ups = [(link, link.peer_name) for link in into.get(n.name, []) if link.key not in inverted]
                ups += [(link, link.name) for link in p.links if link.netns == n.name and link.key in inverted]
                if ups or n.name in work:
                    tasks.append((self._configure, (n.name, ups, work.get(n.name, {})), count(n.name)))
            self._phase(pool, "configure", tasks, sum(t[2] for t in tasks))
        self._files()

    def _phase(self, pool: ThreadPoolExecutor, stage: str,
               tasks: Sequence[tuple[Callable[..., None], Any, int]], total: int,
               meanwhile: Callable[[], None] | None = None) -> None:
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
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()
                    wait(pending)
                    raise f.exception()  # type: ignore[misc]
                done += futs[f]
            if self.progress:
                self.progress(stage, done, total)

    # -- phase 1 --
    def _make_netns(self, group: list[Netns]) -> None:
        self.ledger.intent(group)
        for i, n in enumerate(group):
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(ns.new_netns(n.name))
                except FileExistsError as e:
                    for m in group[i:]:
                        self.ledger.failed(m)  # someone else's (or never made): destroy must not touch it
                    raise _ObjError(n, e) from e
                except OSError as e:
                    for m in group[i + 1:]:
                        self.ledger.failed(m)
                    raise _ObjError(n, e) from e
                r = stack.enter_context(rtnl.Rtnl())
                if r.cookie == self.root_cookie:
                    raise _ObjError(n, "socket landed in the root netns; refusing to write")
                self._early_sysctls(n.name)
                try:
                    r.call(rtnl.link_set(1, up=True))
                except OSError as e:
                    raise _ObjError(n, f"lo up: {_errstr(e)}") from e
            with self._cookie_lock:
                self.cookies[n.name] = r.cookie

    def _make_netns_links(self, arg: tuple[Netns, list[Link]]) -> None:
        n, links = arg
        self._make_netns([n])
        if links:
            self._make_links((n.name, links))

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
                               peer_netns_fd=peer_fd, vni=link.vni, remote=link.remote, master=master)
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

    # -- pods: one visit per leaf netns --
    def _leaves(self, pods: list[tuple[Netns, list[Link], dict[str, list[Any]]]]) -> None:
        for n, inbound, work in pods:
            self._leaf(n, inbound, work)

    def _leaf(self, n: Netns, inbound: list[Link], work: dict[str, list[Any]]) -> None:
        # one ledger write for all the pod's netlink objects (ahead of them, as always)
        self.ledger.intent([n, *inbound, *work.get("addresses", ()), *work.get("routes", ()), *work.get("rules", ())])
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(ns.new_netns(n.name))
            except FileExistsError as e:
                self.ledger.failed(n)  # someone else's: destroy must not touch it
                raise _ObjError(n, e) from e
            except OSError as e:
                raise _ObjError(n, e) from e
            r = stack.enter_context(rtnl.Rtnl())
            if r.cookie == self.root_cookie:
                raise _ObjError(n, "socket landed in the root netns; refusing to write")
            with self._cookie_lock:
                self.cookies[n.name] = r.cookie
            self._early_sysctls(n.name)
            # a fresh netns holds only lo (ifindex 1); we give our veth ends the next indexes
            # ourselves, so addresses and routes go in the same batch, with no dump in between
            idx = {"lo": 1}
            reqs = [_tag(rtnl.link_set(1, up=True), n)]
            for link in inbound:
                ours = link.peer_name or "eth0"
                idx[ours] = len(idx) + 1
                # the same veth, made from the pod's side: our end is the plan's peer end
                reqs.append(_tag(rtnl.link_create(ours, "veth", up=True, mtu=link.mtu, index=idx[ours],
                                                  peer_name=link.name, peer_netns_fd=self._netns_fd(link.netns),
                                                  peer_mac=link.mac), link))
            self._configure_in(r, n.name, [], work, idx=idx, first=reqs, recorded=True)

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
    def _configure(self, arg: tuple[str, list[tuple[Link, str]], dict[str, list[Any]]]) -> None:
        netns, ups, work = arg
        with ns.in_netns(netns), self._sock(netns) as r:
            self._configure_in(r, netns, ups, work)

    def _configure_in(self, r: rtnl.Rtnl, netns: str, ups: list[tuple[Link, str]], work: dict[str, list[Any]],
                      *, idx: dict[str, int] | None = None, first: Sequence[rtnl.Request] = (),
                      recorded: bool = False) -> None:
        """Everything but links, through ``r`` (already in ``netns``).

        One rtnetlink batch carries, in order: ``first`` (a pod's lo and veth), the veth ends
        other workers created here (``ups``: link, device name) brought up, addresses, routes,
        ip rules. Then sysctls, ipsets and iptables. Nothing in the kernel orders routes after
        iptables, and one batch saves a round trip per section (a pod has 1000s of siblings).
        ``idx`` (device name -> ifindex) is given when the caller knows it; else it is dumped.
        ``recorded``: the caller has already written the netlink objects' intents.
        """
        if idx is None:
            idx = r.link_indexes() if work.get("addresses") or work.get("routes") else {}
        reqs = [*first, *(_tag(rtnl.link_set(name=dev, up=True), link) for link, dev in ups)]

        def index(o: Any, dev: str | None) -> int | None:
            if dev is None:
                return None
            if dev not in idx:
                raise _ObjError(o, f"no device {dev!r}")
            return idx[dev]

        addrs, routes, rules = work.get("addresses", []), work.get("routes", []), work.get("rules", [])
        if not recorded:
            self.ledger.intent([*addrs, *routes, *rules])
        reqs += [_tag(rtnl.addr_add(index(a, a.dev), a.ip, a.prefixlen), a) for a in addrs]
        reqs += [_tag(rtnl.route_add(o.dst, oif=index(o, o.dev), gateway=o.gateway, table=o.table, scope=o.scope,
                                     src=o.src, onlink=o.onlink, type=o.type), o) for o in routes]
        reqs += [_tag(rtnl.rule_add(o.priority, table=o.table, fwmark=o.fwmark, fwmask=o.fwmask, goto=o.goto), o)
                 for o in rules]
        if reqs:
            self._check(r.batch(reqs))

        for s in work.get("sysctls", []):
            self.ledger.intent([s])
            _write_sysctl(s)

        if work.get("ipsets") or work.get("ipset_entries"):
            self._ipsets(netns, work.get("ipsets", []), work.get("ipset_entries", []))

        if work.get("ipt_chains") or work.get("ipt_rules"):
            self._iptables(netns, work.get("ipt_chains", []), work.get("ipt_rules", []))

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
                    self.ledger.mkdir(str(d))
                    d.mkdir(exist_ok=True)
                self.ledger.intent([f])
                Path(f.path).write_text(f.content)
            except OSError as e:
                raise _ObjError(f, e) from e
            if self.progress:
                self.progress("files", i + 1, len(files))


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

