"""Make or remove one pod of a running lab: its netns, the veth into it, what is in it
(`netlab waypoint add|rm`, the pod delta of :mod:`netlab.plan.waypoints`).

Apply (:mod:`netlab.kernel.apply`) makes a whole lab in one pipeline; one pod later is this:
the namespace is made with :func:`netlab.netns.new_netns` and its identity (cookie) written to
the lab's ledger from inside it before it takes its name, with the intent of its veth, as apply
does; then the veth (the node end made in the node's netns from the pod's socket, up; the pod
end up), then the pod's and the node end's addresses, routes and sysctls through
:func:`netlab.kernel.live.change_netns` (ledger first). So ``down`` removes it with the lab,
whatever this finished, and a command killed half-way is finished by running it again (a
netns the ledger already has is entered, not made twice; objects already there are kept).

Removal deletes the namespace (after the checks destroy makes: the name holds the namespace
the ledger recorded); its veth, and with it the node end's address and route, go with it.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from typing import Any

from netlab import netns as ns
from netlab.errors import LabStateError
from netlab.kernel import live, rtnl
from netlab.kernel.failures import ObjectError
from netlab.kernel.ledger import Ledger
from netlab.plan.types import Link, Netns


def _in_thread(name: str, fn: Any) -> None:
    """``fn`` in a thread of its own: setns/unshare change the calling thread's netns only."""
    err: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            err.append(e)

    t = threading.Thread(target=run, name=name)
    t.start()
    t.join()
    if err:
        raise err[0]


def add_pod(netns: Netns, link: Link, objs: Sequence[Any], *, cookies: dict[str, int], ledger: Ledger) -> int:
    """Make pod netns ``netns`` with veth ``link`` (node end in ``link.netns``), then ``objs``
    (in the pod's netns or the node's); the pod netns's cookie."""
    node = link.netns
    if node not in cookies:
        raise LabStateError(f"the ledger has no identity for netns {node}; not touching it")
    cookie = cookies.get(netns.name)
    now = ns.netns_id(netns.name)
    if cookie is not None and now == cookie:
        pass  # made by an earlier run that was cut short
    elif now is not None:
        raise LabStateError(f"netns {netns.name} exists and is not the lab's; not touching it")
    else:
        made: list[int] = []

        def make() -> None:
            def named() -> None:
                made.append(ns.current_cookie())
                ledger.named(netns, made[0], [link])

            with ns.new_netns(netns.name, before_name=named):
                _veth(link, cookies[node])

        _in_thread(f"pod-{netns.name}", make)
        cookie = made[0]
    if cookie is not None and now == cookie:
        _in_thread(f"pod-{netns.name}", lambda: _enter_and_veth(netns.name, link, cookies[node]))
    for n, ck in ((netns.name, cookie), (node, cookies[node])):
        mine = [o for o in objs if o.netns == n]
        if mine:
            live.change_netns(n, ck, add=mine, ledger=ledger)
    return cookie


def _enter_and_veth(name: str, link: Link, node_cookie: int) -> None:
    with ns.in_netns(name):
        _veth(link, node_cookie)


def _veth(link: Link, node_cookie: int) -> None:
    """In the pod's netns: lo up, the veth (node end in the node's netns, up; pod end up).
    A veth already there (a re-run) is kept."""
    node_fd = os.open(ns.netns_path(link.netns), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    pod_fd = ns.own_netns_fd()
    try:
        if ns.fd_cookie(node_fd) != node_cookie:
            raise LabStateError(f"netns {link.netns} is not the one the lab made; not touching it")
        peer = link.peer_name or "eth0"
        with rtnl.Rtnl() as r:
            r.call(rtnl.link_set(1, up=True))
            if peer not in r.link_indexes():
                req = rtnl.link_create(link.name, "veth", up=True, mtu=link.mtu, mac=link.mac, netns_fd=node_fd,
                                       peer_name=peer, peer_netns_fd=pod_fd)
                for _q, e in r.batch([req]):
                    if e.errno != errno.EEXIST:
                        raise ObjectError(link, e)
            r.call(rtnl.link_set(r.link_indexes()[peer], up=True))
    finally:
        os.close(node_fd)
        os.close(pod_fd)


def remove_pod(name: str, cookie: int | None) -> bool:
    """Delete pod netns ``name`` if it holds the namespace the ledger recorded; True if deleted."""
    now = ns.netns_id(name)
    if now is None:
        return False  # gone already (a re-run)
    if cookie is None or now != cookie:
        raise LabStateError(f"netns {name} is not the namespace the lab made; not touching it")
    return ns.delete_netns(name)
