"""Sidecar capture as plan values: Istio 1.18.2's ``istio-iptables`` (:func:`sidecar_objects`) and,
for the in-pod datapath, Istio 1.30.3's istio-cni CNI plugin (:func:`cni_plugin_objects`).

1.18 reference §6: the injected init container runs
``istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020``.
That produces nat-table rules only (no mangle, no filter, no ip rules), inside the pod's netns.

Rules are listed in the order istio-iptables appends them (which interleaves chains: the
PREROUTING jump is appended between the ISTIO_IN_REDIRECT and the remaining ISTIO_INBOUND rules).
Each ``spec`` is the ``iptables-legacy-save`` spelling: ``-p tcp --dport N`` is saved as
``-p tcp -m tcp --dport N`` and address matches are printed before ``-o lo``.

Refs name the reference the rule comes from: ``§6 nat <chain> #n`` is the 1.18 reference's
§6, ``§4.2 nat <chain> #n`` the inpod reference's §4.2, so ``grep -rn "nat ISTIO_OUTPUT #3"``
finds both (and the ambient pod's in-pod rule of that name in plan/inpod.py).
"""

from __future__ import annotations

from typing import Any

from netlab import istio
from netlab.plan.types import IptChain, IptRule


def _nat(netns: str, chain: str, ref: str, spec: str) -> IptRule:
    """A nat rule whose ``ref`` must name its chain (so grepping a ref finds the right line)."""
    if f" nat {chain} #" not in ref:
        raise AssertionError(f"ref {ref!r} does not match nat {chain}")
    return IptRule(netns=netns, table="nat", chain=chain, spec=spec, ref=ref)


def sidecar_objects(pod_netns: str) -> list[Any]:
    """§6 nat ruleset for one sidecar pod, in istio-iptables order.

    The four ISTIO_* chains are created without ``jump_from``: istio-iptables *appends* the jumps
    (``-A PREROUTING -p tcp -j ISTIO_INBOUND``, ``-A OUTPUT -p tcp -j ISTIO_OUTPUT``), and they
    carry a ``-p tcp`` match, so they are ordinary rules on the built-in chains.
    """
    ns = pod_netns
    IN, RED = istio.CHAIN_ISTIO_INBOUND, istio.CHAIN_ISTIO_REDIRECT
    INRED, OUT = istio.CHAIN_ISTIO_IN_REDIRECT, istio.CHAIN_ISTIO_OUTPUT
    uid, gid = istio.PROXY_UID, istio.PROXY_GID
    hbone = istio.HBONE_PORT
    local = "127.0.0.1/32"
    ex1, ex2, ex3 = istio.SIDECAR_EXCLUDED_INBOUND_PORTS  # 15090, 15021, 15020 in -d order
    return [
        IptChain(netns=ns, table="nat", chain=IN),
        IptChain(netns=ns, table="nat", chain=RED),
        IptChain(netns=ns, table="nat", chain=INRED),
        IptChain(netns=ns, table="nat", chain=OUT),
        _nat(ns, IN, "§6 nat ISTIO_INBOUND #1", f"-p tcp -m tcp --dport {hbone} -j RETURN"),
        _nat(ns, RED, "§6 nat ISTIO_REDIRECT #1", f"-p tcp -j REDIRECT --to-ports {istio.SIDECAR_OUTBOUND_PORT}"),
        _nat(ns, INRED, "§6 nat ISTIO_IN_REDIRECT #1",
             f"-p tcp -j REDIRECT --to-ports {istio.SIDECAR_INBOUND_PORT}"),
        _nat(ns, "PREROUTING", "§6 nat PREROUTING #1", f"-p tcp -j {IN}"),
        _nat(ns, IN, "§6 nat ISTIO_INBOUND #2", f"-p tcp -m tcp --dport {ex1} -j RETURN"),
        _nat(ns, IN, "§6 nat ISTIO_INBOUND #3", f"-p tcp -m tcp --dport {ex2} -j RETURN"),
        _nat(ns, IN, "§6 nat ISTIO_INBOUND #4", f"-p tcp -m tcp --dport {ex3} -j RETURN"),
        _nat(ns, IN, "§6 nat ISTIO_INBOUND #5", f"-p tcp -j {INRED}"),
        _nat(ns, "OUTPUT", "§6 nat OUTPUT #1", f"-p tcp -j {OUT}"),
        _nat(ns, OUT, "§6 nat ISTIO_OUTPUT #1", f"-s {istio.INBOUND_PASSTHROUGH_SRC}/32 -o lo -j RETURN"),
        _nat(ns, OUT, "§6 nat ISTIO_OUTPUT #2",
             f"! -d {local} -o lo -p tcp -m tcp ! --dport {hbone} -m owner --uid-owner {uid} -j {INRED}"),
        _nat(ns, OUT, "§6 nat ISTIO_OUTPUT #3", f"-o lo -m owner ! --uid-owner {uid} -j RETURN"),
        _nat(ns, OUT, "§6 nat ISTIO_OUTPUT #4", f"-m owner --uid-owner {uid} -j RETURN"),
        _nat(ns, OUT, "§6 nat ISTIO_OUTPUT #5",
             f"! -d {local} -o lo -p tcp -m tcp ! --dport {hbone} -m owner --gid-owner {gid} -j {INRED}"),
        _nat(ns, OUT, "§6 nat ISTIO_OUTPUT #6", f"-o lo -m owner ! --gid-owner {gid} -j RETURN"),
        _nat(ns, OUT, "§6 nat ISTIO_OUTPUT #7", f"-m owner --gid-owner {gid} -j RETURN"),
        _nat(ns, OUT, "§6 nat ISTIO_OUTPUT #8", f"-d {local} -j RETURN"),
        _nat(ns, OUT, "§6 nat ISTIO_OUTPUT #9", f"-j {RED}"),
    ]


def cni_plugin_objects(pod_netns: str) -> list[Any]:
    """Inpod reference §4.2: the nat ruleset istio-cni's CNI plugin writes into a sidecar pod
    (``basic.txt.golden``), in the plugin's append order. The ambient profile of the pinned
    release installs with istio-cni, so sidecar pods are in CNI-plugin mode.

    The differences from 1.18's :func:`sidecar_objects`: the OUTPUT jump has no ``-p tcp``; two
    ``--dport 15020`` RETURNs (tcp and udp) lead ISTIO_OUTPUT (the default outbound exclude); the
    inbound excludes are ``15020,15021,15090``, appended after the 15008 RETURN in that order.
    Chains are made without ``jump_from``: the plugin appends the jumps as ordinary rules.
    """
    ns = pod_netns
    IN, RED = istio.CHAIN_ISTIO_INBOUND, istio.CHAIN_ISTIO_REDIRECT
    INRED, OUT = istio.CHAIN_ISTIO_IN_REDIRECT, istio.CHAIN_ISTIO_OUTPUT
    uid, gid = istio.PROXY_UID, istio.PROXY_GID
    hbone = istio.HBONE_PORT
    local = "127.0.0.1/32"
    ex1, ex2, ex3 = istio.SIDECAR_CNI_EXCLUDED_INBOUND_PORTS  # 15020, 15021, 15090
    status = istio.SIDECAR_CNI_EXCLUDED_OUTBOUND_PORT
    return [
        IptChain(netns=ns, table="nat", chain=IN),
        IptChain(netns=ns, table="nat", chain=RED),
        IptChain(netns=ns, table="nat", chain=INRED),
        IptChain(netns=ns, table="nat", chain=OUT),
        _nat(ns, IN, "§4.2 nat ISTIO_INBOUND #1", f"-p tcp -m tcp --dport {hbone} -j RETURN"),
        _nat(ns, RED, "§4.2 nat ISTIO_REDIRECT #1", f"-p tcp -j REDIRECT --to-ports {istio.SIDECAR_OUTBOUND_PORT}"),
        _nat(ns, INRED, "§4.2 nat ISTIO_IN_REDIRECT #1",
             f"-p tcp -j REDIRECT --to-ports {istio.SIDECAR_INBOUND_PORT}"),
        _nat(ns, "PREROUTING", "§4.2 nat PREROUTING #1", f"-p tcp -j {IN}"),
        _nat(ns, IN, "§4.2 nat ISTIO_INBOUND #2", f"-p tcp -m tcp --dport {ex1} -j RETURN"),
        _nat(ns, IN, "§4.2 nat ISTIO_INBOUND #3", f"-p tcp -m tcp --dport {ex2} -j RETURN"),
        _nat(ns, IN, "§4.2 nat ISTIO_INBOUND #4", f"-p tcp -m tcp --dport {ex3} -j RETURN"),
        _nat(ns, IN, "§4.2 nat ISTIO_INBOUND #5", f"-p tcp -j {INRED}"),
        _nat(ns, "OUTPUT", "§4.2 nat OUTPUT #1", f"-j {OUT}"),
        _nat(ns, OUT, "§4.2 nat ISTIO_OUTPUT #1", f"-p tcp -m tcp --dport {status} -j RETURN"),
        _nat(ns, OUT, "§4.2 nat ISTIO_OUTPUT #2", f"-p udp -m udp --dport {status} -j RETURN"),
        _nat(ns, OUT, "§4.2 nat ISTIO_OUTPUT #3", f"-s {istio.INBOUND_PASSTHROUGH_SRC}/32 -o lo -j RETURN"),
        _nat(ns, OUT, "§4.2 nat ISTIO_OUTPUT #4",
             f"! -d {local} -o lo -p tcp -m tcp ! --dport {hbone} -m owner --uid-owner {uid} -j {INRED}"),
        _nat(ns, OUT, "§4.2 nat ISTIO_OUTPUT #5", f"-o lo -m owner ! --uid-owner {uid} -j RETURN"),
        _nat(ns, OUT, "§4.2 nat ISTIO_OUTPUT #6", f"-m owner --uid-owner {uid} -j RETURN"),
        _nat(ns, OUT, "§4.2 nat ISTIO_OUTPUT #7",
             f"! -d {local} -o lo -p tcp -m tcp ! --dport {hbone} -m owner --gid-owner {gid} -j {INRED}"),
        _nat(ns, OUT, "§4.2 nat ISTIO_OUTPUT #8", f"-o lo -m owner ! --gid-owner {gid} -j RETURN"),
        _nat(ns, OUT, "§4.2 nat ISTIO_OUTPUT #9", f"-m owner --gid-owner {gid} -j RETURN"),
        _nat(ns, OUT, "§4.2 nat ISTIO_OUTPUT #10", f"-d {local} -j RETURN"),
        _nat(ns, OUT, "§4.2 nat ISTIO_OUTPUT #11", f"-j {RED}"),
    ]
