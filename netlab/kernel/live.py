"""Change a running lab's kernel objects in place: a plan delta (:mod:`netlab.plan.relabel`) added
and removed inside namespaces the lab made, ledger first.

Apply (:mod:`netlab.kernel.apply`) only ever makes objects, and destroy only removes namespaces;
a live label change is the one place single objects go: an ipset entry, a route, an ip rule, a
pod's iptables chains (and a pod added live, kernel/livepod.py: its addresses). Every object stays inside a namespace of the lab, so ``down`` still
removes everything with its namespace, whatever this did or did not finish; an added object's
intent is in the ledger before it is made, as apply's are.

Both directions are idempotent (an object already there is left, one already gone is not an
error), so a label command killed half-way is finished by running it again.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Sequence
from typing import Any

from netlab import netns as ns
from netlab.kernel import ipt, rtnl
from netlab.kernel.applier import netlink_requests
from netlab.kernel.failures import ObjectError
from netlab.kernel.ledger import Ledger
from netlab.kernel.sysctl import write_sysctl
from netlab.plan.layout import NetnsWork
from netlab.plan.types import Address, IpSetEntry, IptChain, IptRule, Route, Rule, Sysctl

_GONE = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)
#: ipset's "element already added" on add, "element not added" on del (IPSET_ERR_EXIST, linux/netfilter/ipset/ip_set.h)
IPSET_ERR_EXIST = 4103


def change_netns(netns: str, cookie: int, *, add: Sequence[Any] = (), remove: Sequence[Any] = (),
                 positions: dict[int, int] | None = None, ledger: Ledger | None = None) -> None:
    """In ``netns`` (checked against ``cookie``): remove ``remove``, then add ``add``, each in
    the order istio-cni does (removal: ipset entries, iptables, ip rules, routes; addition:
    sysctls, routes, ip rules, iptables, ipset entries). ``positions``: ``id(rule)`` -> where
    an added rule goes in a chain that exists (else appended)."""
    err: list[BaseException] = []

    def run() -> None:
        try:
            with ns.in_netns(netns):
                _remove(netns, cookie, remove)
                _add(netns, cookie, add, positions or {}, ledger)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            err.append(e)

    # a thread of its own: setns() changes the calling thread's netns, the caller's stays put
    t = threading.Thread(target=run, name=f"live-{netns}")
    t.start()
    t.join()
    if err:
        raise err[0]


def _of(objs: Sequence[Any], cls: type[Any]) -> list[Any]:
    return [o for o in objs if isinstance(o, cls)]


def _netlink(netns: str, cookie: int, objs: Sequence[Any], delete: bool) -> None:
    addrs, routes, rules = _of(objs, Address), _of(objs, Route), _of(objs, Rule)
    if not addrs and not routes and not rules:
        return
    with rtnl.Rtnl() as r:
        r.assert_in(cookie, f"netns {netns}")
        work = NetnsWork(addresses=list(addrs), routes=list(routes), rules=list(rules))
        reqs = netlink_requests(work, r.link_indexes())
        if delete:  # RTM_DEL* take the same attributes as RTM_NEW*: the kernel matches on them
            reqs = list(reversed([rtnl.Request(q.type + 1, 0, q.body, q.tag) for q in reqs]))
        for q, e in r.batch(reqs):
            if delete and e.errno in _GONE:
                continue
            if not delete and e.errno == errno.EEXIST:
                continue
            raise ObjectError(q.tag, e)


def _ipset(netns: str, cookie: int, entries: Sequence[IpSetEntry], delete: bool) -> None:
    if not entries:
        return
    from pyroute2 import IPSet as NlIPSet

    ips = NlIPSet()
    try:
        ns.assert_socket_in(ips.asyncore.socket.fileno(), cookie, f"ipset socket in netns {netns}")
        for e in entries:
            try:
                if delete:
                    ips.delete(e.set, e.ip)
                else:
                    ips.add(e.set, e.ip, comment=e.comment)
            except Exception as x:  # pyroute2's IPSetError: (code, text)
                code = getattr(x, "code", None) or (x.args[0] if x.args and isinstance(x.args[0], int) else None)
                if code in (IPSET_ERR_EXIST, errno.EEXIST if not delete else errno.ENOENT):
                    continue  # already there (add) / already gone (del): the same end state
                raise ObjectError(e, x) from x
    finally:
        ips.close()


def _iptables(netns: str, cookie: int, chains: Sequence[IptChain], rules: Sequence[IptRule], delete: bool,
              positions: dict[int, int]) -> None:
    tables = sorted({c.table for c in chains} | {r.table for r in rules})
    for table in tables:
        cs = [c for c in chains if c.table == table]
        gone = {c.chain for c in cs}
        rs = [r for r in rules if r.table == table and not (delete and r.chain in gone)]
        with ipt.locked():
            tx = ipt.TableTx(table, cookie, f"in netns {netns}")
            try:
                if delete:
                    for r in rs:  # single rules of chains that stay
                        with contextlib.suppress(Exception):
                            tx.delete(r.chain, r.spec)
                    for c in cs:
                        tx.remove_chain(c.chain, c.jump_from)
                else:
                    for c in cs:
                        tx.remove_chain(c.chain, c.jump_from)  # a half-made one from an earlier run
                        tx.create_chain(c.chain)
                        if c.jump_from:
                            tx.insert_jump(c.jump_from, c.chain)
                    for r in sorted(rs, key=lambda r: positions.get(id(r), 1 << 30)):
                        try:
                            if id(r) in positions:
                                tx.insert(r.chain, r.spec, positions[id(r)])
                            else:
                                tx.append(r.chain, r.spec)
                        except Exception as e:
                            raise ObjectError(r, e) from e
                tx.commit()
            finally:
                tx.close()


def _remove(netns: str, cookie: int, objs: Sequence[Any]) -> None:
    _ipset(netns, cookie, _of(objs, IpSetEntry), delete=True)
    _iptables(netns, cookie, _of(objs, IptChain), _of(objs, IptRule), True, {})
    _netlink(netns, cookie, objs, delete=True)


def _add(netns: str, cookie: int, objs: Sequence[Any], positions: dict[int, int], ledger: Ledger | None) -> None:
    if ledger is not None:
        ledger.intent(list(objs))
    for s in _of(objs, Sysctl):
        write_sysctl(s)
    _netlink(netns, cookie, objs, delete=False)
    _iptables(netns, cookie, _of(objs, IptChain), _of(objs, IptRule), False, positions)
    _ipset(netns, cookie, _of(objs, IpSetEntry), delete=False)
