"""Kernel geneve: can this machine create it, and how pyroute2 spells it.

The lab prefers real geneve devices (exact kernel behaviour: skb-mark routing of the outer
packet, MTU derivation, GRO) and falls back to TAP + :mod:`netlab.geneve.encap` when the
kernel has no geneve module. The probe runs in a throwaway namespace, so it never creates a
device in, or otherwise touches, the root namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from typing import Any

from netlab.netns import assert_socket_in, create_netns, current_cookie, delete_netns, in_netns

PROBE_DEV = "gnvprobe"
PROBE_REMOTE = "192.0.2.1"  # TEST-NET-1; never routed, the device is never up


def geneve_link_kwargs(name: str, vni: int, remote: str) -> dict[str, Any]:
    """Arguments for ``IPRoute.link("add", **kw)``: ``ip link add NAME type geneve id VNI remote R``.

    Nothing else is set, as istio-cni does (default dstport 6081, no udpcsum, no MTU).
    """
    return {"ifname": name, "kind": "geneve", "geneve_id": vni, "geneve_remote": remote}


def kernel_geneve_supported(prefix: str = "netlab") -> bool:
    """True if a geneve device can be created here.

    Creates ``<prefix>-probe-<pid>``, adds a geneve device inside it (pyroute2 socket opened in
    a thread that is inside the netns; cookie asserted), and deletes the namespace, which
    destroys the device. Unsupported kinds fail with EOPNOTSUPP (no module to autoload).
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    name = f"{prefix}-probe-{os.getpid()}"
    result: list[bool | BaseException] = []

    def probe() -> None:
        try:
            with in_netns(name):
                cookie = current_cookie()
                with IPRoute() as ipr:
                    assert_socket_in(ipr.fileno(), cookie, "geneve probe netlink socket")
                    try:
                        ipr.link("add", **geneve_link_kwargs(PROBE_DEV, 1, PROBE_REMOTE))
                    except NetlinkError as e:
                        if e.code in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOENT):
                            result.append(False)
                            return
                        raise
                    result.append(bool(ipr.link_lookup(ifname=PROBE_DEV)))
        except BaseException as e:  # surfaced in the caller's thread
            result.append(e)

    create_netns(name)
    try:
        # A private thread, so the caller's thread never sits in the probe netns.
        t = threading.Thread(target=probe, name="geneve-probe", daemon=True)
        t.start()
        t.join()
    finally:
        with contextlib.suppress(OSError):
            delete_netns(name)
    outcome = result[0] if result else RuntimeError("geneve probe thread produced no result")
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


__all__ = ["geneve_link_kwargs", "kernel_geneve_supported"]
