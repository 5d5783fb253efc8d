"""What `netlab trace` must know of each datapath a lab can reproduce (``Plan.datapath``).

Why a small class per datapath instead of ``if inpod`` through the trace: the evidence is read the
same way under both (SYNs on every interface, proxies' connection legs joined by source, rules
replayed and confirmed by counters, the kernel's own ``ip route get``); only a few facts differ,
and each is a question the trace asks here:

* where a proxy's listener is: 1.18's ztunnel listens in its own pod; the in-pod ztunnel listens
  inside each enrolled pod's netns (its legs say which: ``extra.pod``), so its hop is *at* that pod
  (inpod reference §3.2);
* who sends the next leg and with which mark: the in-pod ztunnel makes every socket inside the pod
  with ``SO_MARK 0x539`` (§3.3), which is what keeps it out of the pod's own REDIRECTs (§1.4);
* when a leg has reached an application: under inpod a SYN entering an enrolled pod is ztunnel's
  (15008, or REDIRECTed to 15006); the app is reached only over ``lo`` from ztunnel's socket;
* what a SYN looped over ``lo`` meets: ``lo`` keeps the mark, so mangle PREROUTING sees 0x539 and
  tags the connection 0x111 (§1.4 mangle ISTIO_PRERT #1), and the app's replies get that mark back
  (mangle ISTIO_OUTPUT #1) and the route of ip rule 32764, table 100 (§1.6, §1.7): the reply route
  is shown on that hop, as the kernel answers it.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor

from netlab import istio
from netlab.plan.types import Plan
from netlab.state import ConnLeg
from netlab.verify import iptsim
from netlab.verify.hops import ObservedHop, Place

#: ztunnel's listeners inside an enrolled pod (inpod reference §3.2)
INPOD_ZTUNNEL_PORTS = frozenset({istio.ZTUNNEL_OUTBOUND_PORT, istio.ZTUNNEL_INBOUND_PLAINTEXT_PORT,
                                 istio.HBONE_PORT, istio.ZTUNNEL_DNS_PORT})


class Datapath:
    """The seed's Istio 1.18: proxies listen in their own netns and mark nothing themselves."""

    name = istio.DATAPATH_1_18

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._netns = {p.name: p.netns for p in plan.processes}

    def proxy_netns(self, leg: ConnLeg) -> str:
        """The netns whose listener accepted ``leg``."""
        return self._netns.get(leg.component, leg.component)

    def sender(self, leg: ConnLeg | None) -> tuple[str, int]:
        """(netns, SO_MARK) of the socket the proxy of ``leg`` opens its upstream with, when that
        socket's source need not be an address of that netns ("" and 0: nothing special)."""
        return "", 0

    def reaches_app(self, place: Place, iface: str, dport: int) -> bool:
        """A SYN entering ``place`` on ``iface`` (no proxy there) reaches an application."""
        return place.kind == "pod" and place.mode != "sidecar"

    def looped(self, rs: iptsim.Ruleset, h: ObservedHop, sent: iptsim.Pkt,
               pool: ThreadPoolExecutor) -> Future[iptsim.RouteAnswer] | None:
        """A SYN a local socket sent over ``lo`` (``sent``, as OUTPUT left it) coming back in:
        mangle PREROUTING with the mark ``lo`` kept (nat saw the connection at OUTPUT already).
        Returns the route of the connection's replies when they take one of their own, else None."""
        _looped_in(rs, h, sent)
        return None


class InPod(Datapath):
    """Current Istio's in-pod redirection (``shared/reference/istio-inpod-datapath.md``)."""

    name = istio.DATAPATH_INPOD

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self._pods = {p.ref: p.netns for p in plan.pods}

    def proxy_netns(self, leg: ConnLeg) -> str:
        pod = (leg.extra or {}).get("pod")
        return self._pods.get(str(pod), "") or super().proxy_netns(leg)

    def sender(self, leg: ConnLeg | None) -> tuple[str, int]:
        if leg is not None and (leg.extra or {}).get("pod") in self._pods:
            return self._pods[str(leg.extra["pod"])], istio.INPOD_MARK
        return "", 0

    def reaches_app(self, place: Place, iface: str, dport: int) -> bool:
        if place.kind == "pod" and place.mode == "ambient":
            return iface == "lo" and dport not in INPOD_ZTUNNEL_PORTS
        return super().reaches_app(place, iface, dport)

    def looped(self, rs: iptsim.Ruleset, h: ObservedHop, sent: iptsim.Pkt,
               pool: ThreadPoolExecutor) -> Future[iptsim.RouteAnswer] | None:
        p = _looped_in(rs, h, sent)
        if not p.connmark:
            return None
        reply = iptsim.Pkt(iif=None, oif=None, src=p.dst, dst=p.src, dport=0, connmark=p.connmark)
        rs.run("mangle", "OUTPUT", reply, h.rules)
        return pool.submit(iptsim.route_get, self.plan, h.netns, p.src, p.dst, None, reply.mark)


def _looped_in(rs: iptsim.Ruleset, h: ObservedHop, sent: iptsim.Pkt) -> iptsim.Pkt:
    p = dataclasses.replace(sent, iif="lo", oif=None)
    rs.run("mangle", "PREROUTING", p, h.rules)
    h.mark = p.mark or None
    return p


def of(plan: Plan) -> Datapath:
    """The trace's view of ``plan``'s datapath."""
    return InPod(plan) if plan.datapath == istio.DATAPATH_INPOD else Datapath(plan)
