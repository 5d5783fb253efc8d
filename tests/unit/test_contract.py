"""Hop contracts (no root): the vocabulary validates, matching is an ordered subsequence, and a
mismatch names the first expected hop that never came next to the closest observation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from netlab.topology.load import load_topology, resolve
from netlab.topology.model import Hop, RequestPath
from netlab.verify.contract import find_contract, match
from netlab.verify.hops import ObservedHop, parse_frame


def pkt(at: str, iface: str, d: str, dst: str = "10.0.2.3:80", *, sym: str | None = None, rules: list[str] | None = None,
        table: int | None = None) -> ObservedHop:
    return ObservedHop("packet", 0.0, at, at, "", "10.0.1.3:20000", dst, iface=iface, iface_sym=sym or iface, dir=d,  # type: ignore[arg-type]
                       rules=rules or [], table=table)


def proxy(at: str, component: str, listener: str) -> ObservedHop:
    return ObservedHop("proxy", 0.0, at, at, "", "10.0.1.3:20000", "10.96.0.10:8000",
                       proxy={"component": component, "listener": listener, "up_src": "", "up_dst": "", "proto": "tcp"})


S1_OBSERVED = [
    pkt("pod:foo/sleep", "eth0", "out", "10.96.0.10:8000"),
    pkt("node:node-a", "veth1234", "in", "10.96.0.10:8000", sym="veth(foo/sleep)",
        rules=["§1.5 mangle ztunnel-PREROUTING #15", "§1.5 nat ztunnel-PREROUTING #1"], table=101),
    pkt("node:node-a", "istioout", "out", "10.96.0.10:8000"),
    pkt("node:node-a", "veth9e3b", "out", "10.96.0.10:8000", sym="veth(ztunnel)"),  # Geneve frame: not in the contract
    pkt("ztunnel:node-a", "pistioout", "in", "10.96.0.10:8000", rules=["§2.2 mangle PREROUTING #2"], table=100),
    proxy("ztunnel:node-a", "ztunnel-node-a", "outbound:15001"),
    pkt("ztunnel:node-a", "eth0", "out"),
    pkt("node:node-a", "veth9e3b", "in", sym="veth(ztunnel)", rules=["§1.5 mangle ztunnel-PREROUTING #10"], table=254),
    pkt("node:node-b", "eth0", "in", table=254),
    pkt("pod:bar/httpbin", "eth0", "in", rules=["§6 nat ISTIO_IN_REDIRECT #1"]),
    proxy("pod:bar/httpbin", "httpbin.bar-sidecar", "inbound:15006"),
    pkt("pod:bar/httpbin", "lo", "out", "10.0.2.3:80"),
]


def s1_contract() -> RequestPath:
    topo = load_topology(resolve("ambient-to-sidecar"))
    return next(p for p in topo.paths if p.name == "S1")


def test_seed_s1_contract_matches_and_numbers_every_seed_hop() -> None:
    obs = [ObservedHop(**{**o.__dict__}) for o in S1_OBSERVED]
    m = match(s1_contract().hops, obs)
    assert m.ok, m.divergence
    assert [o.seed_n for o in obs] == ["1", "2", "3", None, "4", "5", "6", "6", "6", "7", "8", "8"]
    assert {o.seed_n for o in obs if o.seed_n} == {str(i) for i in range(1, 9)}


def test_broken_table_101_diverges_at_hop_2_and_names_both_sides() -> None:
    obs = [ObservedHop(**{**o.__dict__}) for o in S1_OBSERVED[:2]]
    obs[1].table, obs[1].route = None, "no route (RTNETLINK answers: Network is unreachable)"
    obs.append(pkt("node:node-a", "eth0", "out", "10.96.0.10:8000"))
    m = match(s1_contract().hops, obs)
    assert not m.ok and m.divergence is not None
    assert m.divergence.expected.n == "2"
    assert m.divergence.observed is obs[1]
    assert "Network is unreachable" in m.divergence.reason and "table 101" in m.divergence.reason
    assert str(m.divergence).startswith("hop (2) diverged: expected node:node-a veth(foo/sleep) in")


def test_missing_tunnel_hop_reports_the_same_namespace_observation() -> None:
    obs = [ObservedHop(**{**o.__dict__}) for o in S1_OBSERVED[:2]]
    obs.append(pkt("node:node-a", "eth0", "out", "10.96.0.10:8000"))  # went to the wire instead of istioout
    m = match(s1_contract().hops, obs)
    assert m.divergence is not None and m.divergence.expected.n == "3"
    assert m.divergence.observed is obs[2]
    assert m.divergence.reason == "iface eth0, not istioout"


def test_order_matters() -> None:
    obs = [ObservedHop(**{**o.__dict__}) for o in S1_OBSERVED]
    obs[2], obs[4] = obs[4], obs[2]  # pistioout seen before istioout
    m = match(s1_contract().hops, obs)
    assert not m.ok and m.divergence is not None and m.divergence.expected.n == "4"


def test_listener_rule_and_port_checks() -> None:
    h = Hop(n="5", at="ztunnel:node-a", listener="ztunnel:15001")
    assert match([h], [proxy("ztunnel:node-a", "ztunnel-node-a", "outbound:15001")]).ok
    m = match([h], [proxy("ztunnel:node-a", "ztunnel-node-a", "inbound:15006")])
    assert m.divergence is not None and "listener ztunnel:15006" in m.divergence.reason
    assert match([Hop(n="w3", at="waypoint:bar-2", listener="waypoint:15008")],
                 [proxy("waypoint:bar-2/waypoint", "waypoint.bar-2", "inbound:15008")]).ok
    m = match([Hop(n="7", at="pod:bar/httpbin", iface="eth0", dir="in", port=80, rules=["§6 nat ISTIO_IN_REDIRECT #1"])],
              [pkt("pod:bar/httpbin", "eth0", "in")])
    assert m.divergence is not None and "did not match" in m.divergence.reason
    m = match([Hop(n="1", at="pod:foo/sleep", iface="eth0", port=8000)], [pkt("pod:foo/sleep", "eth0", "out", "10.0.2.3:80")])
    assert m.divergence is not None and m.divergence.reason == "port 80, not 8000"


def test_empty_trace_diverges_at_first_hop() -> None:
    m = match(s1_contract().hops, [])
    assert m.divergence is not None and m.divergence.expected.n == "1" and m.divergence.observed is None


def test_hop_vocabulary_is_validated() -> None:
    with pytest.raises(ValidationError, match="iface .* or a listener"):
        Hop(n="1", at="pod:foo/sleep")
    with pytest.raises(ValidationError, match="either a packet"):
        Hop(n="1", at="pod:foo/sleep", iface="eth0", listener="sidecar:15001")
    with pytest.raises(ValidationError, match="must be node:"):
        Hop(n="1", at="foo/sleep", iface="eth0")
    with pytest.raises(ValidationError, match="listener"):
        Hop(n="1", at="pod:foo/sleep", listener="envoy:15001")


@pytest.mark.parametrize("topology,path,n_seed", [
    ("ambient-to-sidecar", "S1", 8), ("sidecar-to-ambient", "S2", 9), ("sidecar-to-ambient", "S3", 9),
    ("ambient-to-ambient", "cross-node", 11), ("ambient-to-ambient", "same-node", 7),
    ("sidecar-to-sidecar", "sidecar-to-sidecar", 8), ("plain-to-ambient", "plain-to-ambient", 7),
])
def test_every_topology_path_has_a_contract_numbered_like_the_seed(topology: str, path: str, n_seed: int) -> None:
    topo = load_topology(resolve(topology))
    p = next(x for x in topo.paths if x.name == path)
    numbers = [h.n for h in p.hops if not h.n.startswith("w")]
    assert sorted(set(numbers), key=int) == [str(i) for i in range(1, n_seed + 1)]
    pods = {f"{x.namespace}/{x.name}" for x in topo.pods}
    nodes = {n.name for n in topo.nodes}
    for h in p.hops:
        kind, _, ref = h.at.partition(":")
        assert (ref in pods) if kind == "pod" else (ref in nodes) if kind in ("node", "ztunnel") else True, h.at
    if path == "S3":
        assert [h.n for h in p.hops if h.n.startswith("w")] == ["w1", "w2", "w3", "w4"]


def test_find_contract_by_name_or_from_to() -> None:
    paths = load_topology(resolve("sidecar-to-ambient")).paths
    assert find_contract(paths, name=None, src="foo/sleep", dst="httpbin.bar-1:8000").name == "S2"
    assert find_contract(paths, name=None, src="foo/sleep", dst="helloworld.bar-2.svc.cluster.local:5000").name == "S3"
    assert find_contract(paths, name="S3", src="x", dst="y").name == "S3"
    assert find_contract(paths, name=None, src="foo/sleep", dst="nowhere.bar:1") is None
    with pytest.raises(KeyError):
        find_contract(paths, name="S9", src="", dst="")


def test_parse_frame_decodes_geneve_inner_syn() -> None:
    from scapy.contrib.geneve import GENEVE
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    inner = Ether() / IP(src="10.0.1.3", dst="10.96.0.10") / TCP(sport=20001, dport=8000, flags="S")
    outer = Ether() / IP(src="10.0.1.1", dst="10.0.1.2") / UDP(sport=40000, dport=6081) / GENEVE(vni=1001, proto=0x6558) / inner
    seg = parse_frame(bytes(outer))
    assert seg is not None and seg.is_syn
    assert (seg.src, seg.sport, seg.dst, seg.dport) == ("10.0.1.3", 20001, "10.96.0.10", 8000)
    assert seg.encap == {"type": "geneve", "vni": 1001, "outer_src": "10.0.1.1", "outer_dst": "10.0.1.2"}
    synack = parse_frame(bytes(Ether() / IP() / TCP(flags="SA")))
    assert synack is not None and not synack.is_syn


def test_the_plan_carries_the_hop_contracts_through_plan_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """trace and capture --hops take the contracts from the plan (as saved in plan.json), not
    from the topology file, which may have changed or gone since ``netlab up``."""
    import json
    import shutil

    from netlab.kernel.ledger import plan_json
    from netlab.plan.build import build_plan
    from netlab.plan.types import Plan
    from netlab.topology.load import load_topology, topologies_dir
    from netlab.verify.contract import find_contract, plan_contracts

    f = tmp_path / "s.yaml"
    shutil.copy(topologies_dir() / "sidecar-to-ambient.yaml", f)
    topo = load_topology(f)
    plan = build_plan(topo, source=str(f))
    f.unlink()
    saved = Plan.from_dict(json.loads(plan_json(plan)))
    assert saved == plan and [p.name for p in saved.paths] == ["S2", "S3"]
    assert plan_contracts(saved) == [p.for_datapath("istio-1.18") for p in topo.paths]
    inpod = build_plan(topo, source=str(f), datapath="inpod")  # the same paths, their inpod contracts
    assert plan_contracts(Plan.from_dict(json.loads(plan_json(inpod)))) == [p.for_datapath("inpod") for p in topo.paths]
    assert [h.n for h in plan_contracts(inpod)[1].hops] == ["1", "2", "3", "4", "5", "7", "8", "9", "9", "w1", "w3"]
    assert [h.absent for h in plan_contracts(inpod)[1].hops][-2:] == [True, True]
    s3 = find_contract(plan_contracts(saved), name=None, src="foo/sleep", dst="helloworld.bar-2:5000")
    assert s3 is not None and s3.name == "S3" and [h.n for h in s3.hops][4:8] == ["w1", "w2", "w3", "w4"]
