"""The in-pod datapath's side of the hop contracts (no root): every shipped path has an inpod
contract numbered like the seed's, naming only rules the inpod plan installs where the hop is;
``absent`` hops (S3: the waypoint sees nothing) fail a trace that crossed them; and the rule
walker replays the pod-netns rules of reference §1.4 as the §5 packet walks say (REDIRECT to
15001, 15008 left alone, plaintext to 15006, ztunnel's 0x539 exempt, connmark 0x111 on the loop
over lo, mark 0x111 restored on the app's replies)."""

from __future__ import annotations

import pytest

from netlab import istio
from netlab.plan.build import build_plan
from netlab.plan.types import Plan
from netlab.topology.load import available, load_topology, resolve
from netlab.topology.model import Hop
from netlab.verify import datapaths, iptsim
from netlab.verify.contract import describe, match
from netlab.verify.hops import ObservedHop
from tests import reference_inpod_expect as I

SHIPPED = [(t, p.name) for t, _ in available() for p in load_topology(resolve(t)).paths]


def _num(n: str) -> tuple[int, int]:
    return (0, int(n)) if n.isdigit() else (1, int(n[1:]))


@pytest.mark.parametrize("topology,path", SHIPPED)
def test_every_shipped_path_has_an_inpod_contract_numbered_like_the_seed(topology: str, path: str) -> None:
    topo = load_topology(resolve(topology))
    p = next(x for x in topo.paths if x.name == path)
    inpod = p.for_datapath("inpod")
    assert inpod.hops, f"{topology} {path}: no inpod contract"
    seed_numbers = {h.n for h in p.hops}
    assert {h.n for h in inpod.hops} <= seed_numbers, "an inpod hop numbered where the seed has no such number"
    present = [_num(h.n) for h in inpod.hops if not h.absent and not h.n.startswith("w")]
    assert present == sorted(present), "numbers out of the seed's order"
    plan = build_plan(topo, source=topology, datapath="inpod")
    refs = {(r.netns, r.ref) for r in plan.ipt_rules}
    netns = {f"pod:{x.ref}": x.netns for x in plan.pods} | {f"node:{n.name}": n.netns for n in plan.nodes}
    for h in inpod.hops:
        for ref in h.rules:  # the rule exists where the contract says it matches
            assert (netns[h.at], ref) in refs, (h.n, h.at, ref)
        assert not h.at.startswith("ztunnel:"), "in-pod ztunnel listens in the pods, not in its own netns"
    assert p.for_datapath("istio-1.18").hops == p.hops


def test_s3_inpod_goes_direct_and_an_absent_hop_fails_the_trace() -> None:
    s3 = next(x for x in load_topology(resolve("sidecar-to-ambient")).paths if x.name == "S3").for_datapath("inpod")
    assert s3.source_seen == "client"
    direct = next(h for h in s3.hops if h.n == "3")
    assert direct.port == 15008 and "helloworld" in direct.what
    absent = [h for h in s3.hops if h.absent]
    assert [describe(h) for h in absent] == ["no node:node-c eth0 in", "no waypoint:bar-2 listener waypoint:15008"]
    wp = ObservedHop("proxy", 0.0, "waypoint:bar-2/waypoint", "x", "node-c", "10.0.1.3:1", "10.96.0.11:5000",
                     proxy={"component": "waypoint.bar-2", "listener": "inbound:15008"})
    assert match(absent, []).ok
    m = match(absent, [wp])
    assert not m.ok and m.divergence is not None and m.divergence.observed is wp
    assert str(m.divergence).startswith("hop (w3) diverged: expected no waypoint:bar-2 listener waypoint:15008")
    with pytest.raises(ValueError):
        Hop(n="w3", at="waypoint:bar-2", absent=True)  # still a packet or a proxy hop


@pytest.fixture(scope="module")
def pod_rules() -> tuple[Plan, iptsim.Ruleset, str]:
    plan = build_plan(load_topology(resolve("ambient-to-ambient")), source="t", datapath="inpod")
    pod = plan.pod("bar/httpbin")
    return plan, iptsim.Ruleset.from_save(plan, pod.netns, "".join(I.pod_save(dns=True).values())), pod.ip


def test_the_walker_replays_the_pod_netns_rules_of_the_packet_walks(pod_rules: tuple[Plan, iptsim.Ruleset, str]) -> None:
    plan, rs, ip = pod_rules
    app = iptsim.Pkt(iif=None, oif="eth0", src=ip, dst="10.96.0.10", dport=8000)  # §5 S1 2: the app's connect
    hits: list[str] = []
    assert (rs.run("mangle", "OUTPUT", app, hits), rs.run("nat", "OUTPUT", app, hits)) == ("continue", "redirect")
    assert hits == ["§1.4 nat ISTIO_OUTPUT #6"] and (app.dst, app.dport) == ("127.0.0.1", 15001)
    zt = iptsim.Pkt(iif=None, oif="eth0", src=ip, dst="10.0.2.3", dport=15008, mark=istio.INPOD_MARK)
    hits = []
    assert rs.run("nat", "OUTPUT", zt, hits) == "continue" and hits == []  # §5 S1 3: 0x539 is exempt
    hbone = iptsim.Pkt(iif="eth0", oif=None, src="10.0.1.3", dst=ip, dport=15008)
    hits = []
    assert rs.run("mangle", "PREROUTING", hbone, hits) == rs.run("nat", "PREROUTING", hbone, hits) == "continue"
    assert hits == [] and hbone.mark == 0  # §5 S2 3: 15008 is not redirected
    plain = iptsim.Pkt(iif="eth0", oif=None, src="10.0.1.3", dst=ip, dport=80)
    hits = []
    assert rs.run("nat", "PREROUTING", plain, hits) == "redirect" and plain.dport == 15006
    assert hits == ["§1.4 nat ISTIO_PRERT #2"]
    probe = iptsim.Pkt(iif="eth0", oif=None, src="169.254.7.127", dst=ip, dport=80)
    hits = []
    assert rs.run("nat", "PREROUTING", probe, hits) == "accept" and hits == ["§1.4 nat ISTIO_PRERT #1"]


def test_the_loop_over_lo_tags_the_connection_and_replies_get_0x111(pod_rules: tuple[Plan, iptsim.Ruleset, str]) -> None:
    plan, rs, ip = pod_rules
    sent = iptsim.Pkt(iif=None, oif="lo", src="10.0.1.3", dst=ip, dport=80, mark=0x539)  # §5 S2 5: ztunnel -> app
    hits: list[str] = []
    assert rs.run("nat", "OUTPUT", sent, hits) == "accept" and hits == ["§1.4 nat ISTIO_OUTPUT #5"]
    h = ObservedHop("packet", 0.0, "pod:bar/httpbin", "x", "node-b", iface="lo", dir="in")
    assert datapaths.Datapath(plan).looped(rs, h, sent, None) is None  # type: ignore[arg-type]  # (1.18: no reply route)
    assert h.rules == ["§1.4 mangle ISTIO_PRERT #1"] and h.mark == 0x539
    reply = iptsim.Pkt(iif=None, oif=None, src=ip, dst="10.0.1.3", dport=0, connmark=0x111)
    hits = []
    rs.run("mangle", "OUTPUT", reply, hits)
    assert hits == ["§1.4 mangle ISTIO_OUTPUT #1"] and reply.mark == 0x111  # §1.7: -> ip rule 32764, table 100
    other = iptsim.Pkt(iif=None, oif=None, src=ip, dst="10.0.1.3", dport=0)
    hits = []
    rs.run("mangle", "OUTPUT", other, hits)
    assert hits == [] and other.mark == 0
