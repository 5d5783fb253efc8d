"""The in-pod plan (netlab/plan/inpod.py and the inpod half of plan/build.py) against the
hand-written expectations of tests/reference_inpod_expect.py: per enrolled pod, per node, per
sidecar pod, and the absence of every 1.18 node object. No root, no kernel."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from netlab.cli import main
from netlab.errors import TopologyError
from netlab.export.releases import choose
from netlab.plan import ambient, inpod
from netlab.plan.build import build_plan
from netlab.plan.types import File, IpSet, IpSetEntry, IptChain, IptRule, Link, Plan, Process, Route, Rule
from netlab.topology.load import load_topology
from tests import reference_expect as X
from tests import reference_inpod_expect as I

SHIPPED = ["ambient-to-sidecar", "sidecar-to-ambient", "ambient-to-ambient", "sidecar-to-sidecar",
           "plain-to-ambient", "coexistence", "two-nodes", "own-programs"]


def plan_of(name: str | Path, **kw: object) -> Plan:
    return build_plan(load_topology(name), lab="ip-u", datapath="inpod", **kw)  # type: ignore[arg-type]


def topo_file(tmp_path: Path, body: str) -> Path:
    f = tmp_path / "t.yaml"
    f.write_text(body)
    return f


def test_datapath_is_recorded_default_and_overridable() -> None:
    t = load_topology("sidecar-to-ambient")
    assert t.datapath == "istio-1.18"
    assert build_plan(t).datapath == "istio-1.18"
    assert build_plan(t, datapath="inpod").datapath == "inpod"
    assert choose(None, t).datapath == "istio-1.18"  # export follows the topology's key
    assert choose(None, t.model_copy(update={"datapath": "inpod"})).istio == "1.30.3"


def test_topology_key_selects_inpod(tmp_path: Path) -> None:
    src = Path("topologies/ambient-to-ambient.yaml").read_text()
    f = topo_file(tmp_path, src.replace("name: ambient-to-ambient", "name: a2a\ndatapath: inpod"))
    t = load_topology(f)
    assert t.datapath == "inpod"
    assert build_plan(t).datapath == "inpod"
    assert build_plan(t, datapath="istio-1.18").datapath == "istio-1.18"  # --datapath wins over the file
    assert choose(None, t).datapath == "inpod"


@pytest.mark.parametrize("topology", SHIPPED)
def test_every_enrolled_pod_has_the_reference_rules(topology: str) -> None:
    p = plan_of(topology)
    objs = p.objects()
    enrolled = [q for q in p.pods if q.mode == "ambient"]
    for q in enrolled:
        for table, text in I.pod_save().items():
            assert X.render_save(objs, q.netns, table) == text, (q.ref, table)
        assert X.render_ip_rules(objs, q.netns) == I.pod_ip_rules(), q.ref
        assert X.render_routes(objs, q.netns, (100,)) == I.pod_routes(), q.ref
    for q in p.pods:
        if q.mode == "sidecar":
            assert X.render_save(objs, q.netns, "nat") == I.sidecar_cni_nat_save(), q.ref
            assert X.render_save(objs, q.netns, "mangle") == I.EMPTY_MANGLE_SAVE
        elif q.mode != "ambient":  # plain, waypoint, ztunnel, kube-dns: nothing of Istio's
            for table, text in I.ztunnel_save().items():
                assert X.render_save(objs, q.netns, table) == text, (q.ref, table)
            assert X.render_ip_rules(objs, q.netns) == I.node_ip_rules()


@pytest.mark.parametrize("topology", SHIPPED)
def test_nodes_have_probe_snat_and_no_1_18_object(topology: str) -> None:
    p = plan_of(topology)
    objs = p.objects()
    ambient_lab = any(q.mode == "ambient" for q in p.pods)
    for n in p.nodes:
        mine = [q.ip for q in p.pods if q.node == n.name and q.mode == "ambient"]
        if ambient_lab:
            for table, text in I.node_save().items():
                assert X.drop_chains(X.render_save(objs, n.netns, table)) == text, (n.name, table)
            assert X.first_rule(X.render_save(objs, n.netns, "nat"), "POSTROUTING") == "-A POSTROUTING -j ISTIO_POSTRT"
            sets = [o for o in objs if isinstance(o, IpSet) and o.netns == n.netns]
            assert [(s.name, s.type, s.comment) for s in sets] == [(I.PROBE_IPSET, I.PROBE_IPSET_TYPE, True)]
            entries = [o for o in objs if isinstance(o, IpSetEntry) and o.netns == n.netns]
            assert [e.ip for e in entries] == I.probe_ipset_members(mine)
            assert {e.ip: e.comment for e in entries} == {q.ip: ambient.pod_uid(q) for q in p.pods if q.ip in mine}
        assert X.render_ip_rules(objs, n.netns) == I.node_ip_rules()
        assert not any(isinstance(o, Route) and o.netns == n.netns and o.table in I.ABSENT_TABLES for o in objs)
    # §2.2: no geneve/tap device, no ztunnel-pods-ips, no 1.18 ip rule anywhere, no geneve relay
    assert not any(isinstance(o, Link) and (o.kind in ("tap", "geneve") or o.name in I.ABSENT_DEVICES) for o in objs)
    assert not any(isinstance(o, (IpSet, IpSetEntry)) and I.ABSENT_IPSET in (getattr(o, "name", ""), getattr(o, "set", ""))
                   for o in objs)
    assert not any(isinstance(o, Rule) and o.priority in I.ABSENT_RULE_PRIOS for o in objs)
    assert not any(isinstance(o, Process) and o.kind == "geneve" for o in objs)
    assert not any(isinstance(o, IptChain) and o.chain.startswith("ztunnel-") for o in objs)
    assert not any(isinstance(o, IptRule) and "TPROXY" in o.spec for o in objs)
    agents = sorted(o.name for o in objs if isinstance(o, Process) and o.kind == "nodeagent")
    assert agents == (sorted(f"istio-cni-{n.name}" for n in p.nodes) if ambient_lab else [])


def test_refs_grep_to_their_builder() -> None:
    """``grep "nat ISTIO_OUTPUT #6"`` lands on the line in plan/inpod.py that builds it (and the
    1.18 counterpart's grep on plan/ambient.py): one building line per ref."""
    out = subprocess.run(["grep", "-rn", "nat ISTIO_OUTPUT #6", "netlab/"], capture_output=True, text=True)
    code = [ln for ln in out.stdout.splitlines() if re.search(r'_ipt\(.*"§1\.4 nat ISTIO_OUTPUT #6"', ln)]
    assert len(code) == 1 and code[0].startswith("netlab/plan/inpod.py:"), out.stdout
    objs = plan_of("ambient-to-ambient").objects()
    refs = [o.ref for o in objs if isinstance(o, IptRule) and o.ref.startswith("§")]
    for ref in set(refs):
        hits = subprocess.run(["grep", "-rn", f'"{ref}"', "netlab/plan/"], capture_output=True, text=True).stdout
        assert len(hits.splitlines()) == 1, (ref, hits)


def test_dns_capture_off_and_pod_variants(tmp_path: Path) -> None:
    f = topo_file(tmp_path, """\
name: v
datapath: inpod
inpod: {dnsCapture: false}
nodes: [{name: n1}]
namespaces:
  foo: {labels: {istio.io/dataplane-mode: ambient}}
pods:
  - {name: a, namespace: foo, node: n1, app: sleep}
  - {name: b, namespace: foo, node: n1, app: sleep, annotations: {ambient.istio.io/dns-capture: "true"}}
  - {name: c, namespace: foo, node: n1, app: sleep, annotations: {ambient.istio.io/bypass-inbound-capture: "true"}}
""")
    p = build_plan(load_topology(f), lab="v")
    objs = p.objects()
    want = {"foo/a": I.pod_save(dns=False), "foo/b": I.pod_save(dns=True), "foo/c": I.pod_save(dns=False, bypass_inbound=True)}
    for ref, tables in want.items():
        q = p.pod(ref)
        for table, text in tables.items():
            assert X.render_save(objs, q.netns, table) == text, (ref, table)
    assert not p.dns_capture
    assert not any(s.name == "kube-dns" for s in p.services)
    hosts = next(o for o in objs if isinstance(o, File) and o.path.endswith("v-foo-a/hosts"))
    assert "svc.cluster.local" not in hosts.content  # (no services in this lab)
    assert not any(isinstance(o, File) and o.path.endswith("resolv.conf") for o in objs)


def test_dns_capture_kube_dns_and_resolv_conf() -> None:
    p = plan_of("sidecar-to-ambient")
    one_eight = build_plan(load_topology("sidecar-to-ambient"), lab="ip-u")
    assert p.dns_capture
    dns = next(s for s in p.services if s.name == "kube-dns")
    assert (dns.namespace, dns.port, dns.protocols) == ("kube-system", 53, ("udp", "tcp"))
    # every other address is the same under both datapaths (kube-dns is allocated last)
    assert {q.ref: q.ip for q in one_eight.pods} == {q.ref: q.ip for q in p.pods if q.ref != "kube-system/kube-dns"}
    assert {s.name: s.vip for s in one_eight.services} == {s.name: s.vip for s in p.services if s.name != "kube-dns"}
    files = {o.path: o.content for o in p.objects() if isinstance(o, File)}
    sleep = p.pod("foo/sleep")
    assert files[f"/etc/netns/{sleep.netns}/resolv.conf"] == (
        f"nameserver {dns.vip}\nsearch foo.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n")
    assert "httpbin" not in files[f"/etc/netns/{sleep.netns}/hosts"]
    node_a = p.node("node-a").netns
    dnat = [o.spec for o in p.objects() if isinstance(o, IptRule) and o.netns == node_a and o.ref.endswith("kube-dns")]
    kd = p.pod("kube-system/kube-dns")
    assert dnat == [f"-d {dns.vip}/32 -p udp -m udp --dport 53 -j DNAT --to-destination {kd.ip}:53",
                    f"-d {dns.vip}/32 -p tcp -m tcp --dport 53 -j DNAT --to-destination {kd.ip}:53"]
    assert any(isinstance(o, Process) and o.argv[0] == "netlab.mesh.kubedns" for o in p.objects())


def test_enrollment_follows_the_enablement_selectors(tmp_path: Path) -> None:
    """§2.3: the pod label enrols in a plain namespace, ``none`` opts out of an ambient one, a
    sidecar is never enrolled; the 1.18 annotation is not an input any more."""
    f = topo_file(tmp_path, """\
name: e
nodes: [{name: n1}]
namespaces:
  amb: {labels: {istio.io/dataplane-mode: ambient}}
  plain: {}
  sc: {labels: {istio-injection: enabled}}
pods:
  - {name: in-amb, namespace: amb, node: n1, app: sleep}
  - {name: opted-out, namespace: amb, node: n1, app: sleep, labels: {istio.io/dataplane-mode: none}}
  - {name: annotated, namespace: amb, node: n1, app: sleep, annotations: {ambient.istio.io/redirection: disabled}}
  - {name: by-label, namespace: plain, node: n1, app: sleep, labels: {istio.io/dataplane-mode: ambient}}
  - {name: plain, namespace: plain, node: n1, app: sleep}
  - {name: side, namespace: sc, node: n1, app: sleep, labels: {istio.io/dataplane-mode: ambient}}
""")
    t = load_topology(f)
    modes = {q.ref: q.mode for q in build_plan(t, datapath="inpod").pods if q.mode != "ztunnel"}
    assert modes == {"amb/in-amb": "ambient", "amb/opted-out": "plain", "amb/annotated": "ambient",
                     "plain/by-label": "ambient", "plain/plain": "plain", "sc/side": "sidecar",
                     "kube-system/kube-dns": "plain"}
    one_eight = {q.ref: q.mode for q in build_plan(t).pods if q.mode != "ztunnel"}
    assert one_eight["amb/annotated"] == "plain" and one_eight["plain/by-label"] == "plain"  # 1.18 unchanged


def test_sidecars_carry_the_tunnel_label(tmp_path: Path) -> None:
    p = plan_of("ambient-to-sidecar")
    assert dict(p.pod("bar/httpbin").labels)["networking.istio.io/tunnel"] == "http"
    assert "networking.istio.io/tunnel" not in dict(build_plan(load_topology("ambient-to-sidecar")).pod("bar/httpbin").labels)
    src = Path("topologies/ambient-to-sidecar.yaml").read_text().replace("name: ambient-to-sidecar", "name: s\ninpod: {sidecarTunnel: none}")
    q = build_plan(load_topology(topo_file(tmp_path, src)), datapath="inpod").pod("bar/httpbin")
    assert "networking.istio.io/tunnel" not in dict(q.labels)


def test_waypoint_binding(tmp_path: Path) -> None:
    p = plan_of("sidecar-to-ambient")
    assert {s.name: s.waypoint for s in p.services} == {"httpbin": "", "helloworld": "bar-2/waypoint", "kube-dns": ""}
    assert all(s.waypoint == "" for s in build_plan(load_topology("sidecar-to-ambient")).services)  # 1.18: workloads
    src = Path("topologies/sidecar-to-ambient.yaml").read_text()
    opted = src.replace("selector: {app: helloworld}}", "selector: {app: helloworld}, labels: {istio.io/use-waypoint: none}}")
    assert next(s for s in plan_of(topo_file(tmp_path, opted)).services if s.name == "helloworld").waypoint == ""
    wrong = src.replace("selector: {app: helloworld}}", "selector: {app: helloworld}, labels: {istio.io/use-waypoint: nope}}")
    with pytest.raises(TopologyError, match="use-waypoint names waypoint 'nope'"):
        plan_of(topo_file(tmp_path, wrong))


def test_1_18_plan_has_no_inpod_object() -> None:
    for name in SHIPPED:
        p = build_plan(load_topology(name), lab="ip-u")
        assert p.datapath == "istio-1.18" and not p.dns_capture
        objs = p.objects()
        assert not any(isinstance(o, IptChain) and o.chain in ("ISTIO_PRERT", "ISTIO_POSTRT") for o in objs)
        assert not any(isinstance(o, Process) and o.kind == "nodeagent" for o in objs)
        assert not any(s.name == "kube-dns" for s in p.services)


def test_cli_plan_datapath(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "ambient-to-ambient", "--datapath", "inpod", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["datapath"] == "inpod"
    assert main(["plan", "ambient-to-ambient", "--datapath", "inpod"]) == 0
    text = capsys.readouterr().out
    assert "datapath inpod" in text and "(§1.4 nat ISTIO_OUTPUT #6)" in text and "istioin" not in text


def test_pod_objects_refuse_a_pod_that_is_not_enrolled() -> None:
    q = plan_of("ambient-to-sidecar").pod("bar/httpbin")
    with pytest.raises(ValueError, match="not an ambient pod"):
        inpod.pod_objects(q)


def test_an_inpod_plan_without_the_mesh_starts_no_kube_dns_stand_in() -> None:
    """``Lab.up(..., mesh=False)`` writes no registry, and the kube-dns stand-in answers from it:
    it must not be planned then (it was, and such an `up` failed waiting for it)."""
    with_mesh = {p.argv[0] for p in plan_of("ambient-to-sidecar").processes}
    without = plan_of("ambient-to-sidecar", mesh=False).processes
    assert "netlab.mesh.kubedns" in with_mesh
    assert [p.argv[0] for p in without if p.argv[0].startswith("netlab.mesh.")] == []
    assert "netlab.apps.httpbin" in {p.argv[0] for p in without}
