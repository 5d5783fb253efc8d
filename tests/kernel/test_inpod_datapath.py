"""Every shipped topology under ``--datapath inpod``, end to end, with every proxy running:

* requests by service name from each path's source: 200, the right body, and the source the app
  saw (httpbin's ``/ip``, helloworld's own log): S2's app sees the client pod, S1's sidecar app
  127.0.0.6, A2 through the waypoint the waypoint; which proxies carried each request (their
  connection legs), and which did not: S3's sidecar goes straight to helloworld's 15008, the
  waypoint sees nothing;
* each enrolled pod's ``iptables-legacy-save``, ``ip rule`` and table 100, each node's nat table
  and probe ipset, each sidecar pod's CNI-plugin rules, compared with the hand-written
  expectations of tests/reference_inpod_expect.py; and no 1.18 node object anywhere (no
  geneve/tap device, no ztunnel-pods-ips, no ip rules 100-103, no tables 100-102, no TPROXY);
* DNS capture: a name ztunnel does not know leaves the pod in conntrack zone 1 for kube-dns;
* status, rules, stats and logs of an inpod lab.

Expectations of what each request shows are the inpod reference's packet walks (§5, §6.2),
written here by hand, not read from the topology files (whose hop contracts are 1.18's).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest

from netlab.lab import Lab
from netlab.mesh.connlog import read_legs
from netlab.plan.ambient import pod_uid
from tests import reference_expect as X
from tests import reference_inpod_expect as I

pytestmark = pytest.mark.kernel

TABLES = ("mangle", "nat", "raw", "filter")


@dataclass(frozen=True)
class Req:
    src: str  # client pod
    url: str
    body: str  # expected in the body
    seen: str  # what the app sees: a pod ref (its IP), "127.0.0.6"
    via: tuple[str, ...] = ()  # components that carry it (a leg each)
    not_via: tuple[str, ...] = ()  # components that must not see it
    app: str = ""  # helloworld: the component whose own log names the client
    hbone_to: tuple[str, ...] = field(default=())  # (component, pod ref): that leg goes over HBONE to <pod>:15008


REQS: dict[str, list[Req]] = {
    "ambient-to-sidecar": [  # S1: HBONE to the sidecar's 15008, the app from 127.0.0.6 (§4.5)
        Req("foo/sleep", "http://httpbin.bar:8000/ip", '"origin"', "127.0.0.6",
            via=("ztunnel-node-a", "httpbin.bar-sidecar"), hbone_to=("ztunnel-node-a", "bar/httpbin")),
    ],
    "sidecar-to-ambient": [
        # S2: the sidecar's HBONE lands on ztunnel's 15008 in httpbin's netns; the app sees sleep
        Req("foo/sleep", "http://httpbin.bar-1:8000/ip", '"origin"', "foo/sleep",
            via=("sleep.foo-sidecar", "ztunnel-node-b"), hbone_to=("sleep.foo-sidecar", "bar-1/httpbin")),
        # S3: sidecars ignore waypoints (§4.4): straight to helloworld's 15008, the waypoint sees nothing
        Req("foo/sleep", "http://helloworld.bar-2:5000/hello", "Hello version: v1", "foo/sleep",
            via=("sleep.foo-sidecar", "ztunnel-node-d"), not_via=("waypoint.bar-2",), app="helloworld.bar-2",
            hbone_to=("sleep.foo-sidecar", "bar-2/helloworld")),
    ],
    "ambient-to-ambient": [  # A1, across nodes and on one node (no fast path: 15008 either way)
        Req("foo/sleep", "http://httpbin.bar:8000/ip", '"origin"', "foo/sleep", via=("ztunnel-node-a", "ztunnel-node-b"),
            hbone_to=("ztunnel-node-a", "bar/httpbin")),
        Req("foo/sleep", "http://httpbin-local.bar:8000/ip", '"origin"', "foo/sleep", via=("ztunnel-node-a",),
            hbone_to=("ztunnel-node-a", "bar/httpbin-local")),
    ],
    "sidecar-to-sidecar": [
        Req("foo/sleep", "http://httpbin.bar:8000/ip", '"origin"', "127.0.0.6", via=("sleep.foo-sidecar", "httpbin.bar-sidecar")),
    ],
    "plain-to-ambient": [  # ztunnel's 15006 in httpbin's netns, the client's IP kept
        Req("legacy/sleep", "http://httpbin.bar:8000/ip", '"origin"', "legacy/sleep", via=("ztunnel-node-b",)),
    ],
    "coexistence": [
        Req("amb/sleep", "http://httpbin.bar:8000/ip", '"origin"', "127.0.0.6", via=("ztunnel-node-a", "httpbin.bar-sidecar"),
            hbone_to=("ztunnel-node-a", "bar/httpbin")),
        Req("amb/sleep", "http://httpbin.bar-1:8000/ip", '"origin"', "amb/sleep", via=("ztunnel-node-a", "ztunnel-node-b")),
        # A2: the Service is bound to the waypoint: ztunnel -> waypoint -> helloworld; the app sees the waypoint
        Req("amb/sleep", "http://helloworld.bar-2:5000/hello", "Hello version: v1", "bar-2/waypoint",
            via=("ztunnel-node-a", "waypoint.bar-2", "ztunnel-node-d"), app="helloworld.bar-2",
            hbone_to=("ztunnel-node-a", "bar-2/waypoint")),
        Req("sc/sleep", "http://httpbin.bar:8000/ip", '"origin"', "127.0.0.6", via=("sleep.sc-sidecar", "httpbin.bar-sidecar")),
        Req("sc/sleep", "http://httpbin.bar-1:8000/ip", '"origin"', "sc/sleep", via=("sleep.sc-sidecar", "ztunnel-node-b")),
        Req("sc/sleep", "http://helloworld.bar-2:5000/hello", "Hello version: v1", "sc/sleep",
            via=("sleep.sc-sidecar", "ztunnel-node-d"), not_via=("waypoint.bar-2",), app="helloworld.bar-2"),
        Req("legacy/sleep", "http://httpbin.bar-1:8000/ip", '"origin"', "legacy/sleep", via=("ztunnel-node-b",)),
        Req("legacy/sleep", "http://helloworld.bar-2:5000/hello", "Hello version: v1", "legacy/sleep",
            via=("ztunnel-node-d",), not_via=("waypoint.bar-2",), app="helloworld.bar-2"),
    ],
    "own-programs": [
        Req("foo/client", "http://web.bar:8000/", "Directory listing", "127.0.0.6", via=("ztunnel-node-a", "web.bar-sidecar")),
    ],
    "two-nodes": [
        Req("default/a2", "http://web.default:8000/ip", '"origin"', "default/a2"),
    ],
}


@pytest.fixture(scope="module", params=list(REQS))
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab.up(request.param, name="ip-" + request.param[:12], datapath="inpod")
    try:
        yield lab
    finally:
        lab.down()


def sh(netns: str, *argv: str) -> str:
    p = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"[{netns}] {argv}: {p.stderr}"
    return p.stdout


def curl(lab: Lab, pod: str, url: str) -> tuple[int, str]:
    r = lab.exec_capture(pod, ["curl", "-s", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", url], timeout=15)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def leg_counts(lab: Lab) -> dict[str, list[dict[str, Any]]]:
    return {name: read_legs(path) for name, path in lab.files.conn_logs().items()}


def app_client(lab: Lab, component: str, path: str) -> str:
    """The client address the app logged for its newest request of ``path``."""
    for line in reversed(lab.files.log(component).read_text().splitlines()):
        if line.startswith("{") and f'"path":"{path}"' in line.replace(" ", ""):
            return str(json.loads(line)["client"]).rsplit(":", 1)[0]
    raise AssertionError(f"{component} logged no request of {path}")


def test_requests_by_service_name(lab: Lab) -> None:
    plan = lab.plan
    assert plan.datapath == "inpod"
    for r in REQS[plan.topology]:
        before = leg_counts(lab)
        code, body = curl(lab, r.src, r.url)
        assert code == 200 and r.body in body, (r, code, body)
        want_ip = r.seen if r.seen == "127.0.0.6" else plan.pod(r.seen).ip
        if '"origin"' in r.body:
            assert json.loads(body)["origin"] == want_ip, (r, body)
        if r.app:
            assert app_client(lab, r.app, urlsplit(r.url).path) == want_ip, r
        new: dict[str, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + 3
        while True:  # legs are written when a connection ends, just after curl returns
            after = leg_counts(lab)
            new = {c: legs[len(before.get(c, [])):] for c, legs in after.items()}
            if all(new.get(c) for c in r.via) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for c in r.via:
            assert new.get(c), f"{r}: no leg in {c} (new legs: {new})"
            assert all(g["outcome"] == "ok" for g in new[c]), new[c]
        for c in r.not_via:
            assert not new.get(c), f"{r}: {c} saw it: {new[c]}"
        if r.hbone_to:
            comp, ref = r.hbone_to
            out = [(g["proto"], g["up_dst"]) for g in new[comp] if g["listener"].startswith("outbound:")]
            assert out == [("hbone", f"{plan.pod(ref).ip}:15008")], new[comp]
        for c, legs in new.items():  # in-pod ztunnel legs say in which pod's netns the listener was
            if c.startswith("ztunnel-"):
                assert all(g.get("extra", {}).get("pod") for g in legs), legs


def test_pod_netns_match_the_reference(lab: Lab) -> None:
    plan = lab.plan
    for p in plan.pods:
        if p.mode == "ambient":
            for table, text in I.pod_save(dns=plan.dns_capture).items():
                assert X.normalise_save(sh(p.netns, "iptables-legacy-save", "-t", table), table) == text, (p.ref, table)
            assert X.normalise_ip_rules(sh(p.netns, "ip", "rule", "show")) == I.pod_ip_rules(), p.ref
            routes = X.split_route_tables(sh(p.netns, "ip", "-4", "route", "show", "table", "all"))
            assert {t: routes.get(str(t), []) for t in (100,)} == I.pod_routes(), p.ref
        elif p.mode == "sidecar":
            assert X.normalise_save(sh(p.netns, "iptables-legacy-save", "-t", "nat"), "nat") == I.sidecar_cni_nat_save()
            assert X.normalise_save(sh(p.netns, "iptables-legacy-save", "-t", "mangle"), "mangle") == I.EMPTY_MANGLE_SAVE
        else:  # plain, waypoint (§3.6: no iptables), ztunnel (§2.2: untouched), kube-dns
            for table, text in I.ztunnel_save().items():
                assert X.normalise_save(sh(p.netns, "iptables-legacy-save", "-t", table), table) == text, (p.ref, table)
            assert X.normalise_ip_rules(sh(p.netns, "ip", "rule", "show")) == I.node_ip_rules(), p.ref
            assert "table 100" not in sh(p.netns, "ip", "-4", "route", "show", "table", "all"), p.ref


def test_nodes_match_the_reference_and_have_no_1_18_object(lab: Lab) -> None:
    plan = lab.plan
    ambient = any(p.mode == "ambient" for p in plan.pods)
    for n in plan.nodes:
        enrolled = [p for p in plan.pods if p.node == n.name and p.mode == "ambient"]
        saves = {t: X.normalise_save(sh(n.netns, "iptables-legacy-save", "-t", t), t) for t in TABLES}
        if ambient:
            assert X.first_rule(saves["nat"], "POSTROUTING") == "-A POSTROUTING -j ISTIO_POSTRT"
            for table, text in I.node_save().items():
                assert X.drop_chains(saves[table]) == text, (n.name, table)
            typ, header, members = X.parse_ipset_list(sh(n.netns, "ipset", "list", I.PROBE_IPSET))
            assert typ == I.PROBE_IPSET_TYPE and " comment" in f" {header} "
            assert sorted(members, key=lambda ip: tuple(map(int, ip.split(".")))) == I.probe_ipset_members(p.ip for p in enrolled)
            assert members == {p.ip: pod_uid(p) for p in enrolled}
        assert "ISTIO_POSTRT" in saves["nat"] or not ambient
        assert X.normalise_ip_rules(sh(n.netns, "ip", "rule", "show")) == I.node_ip_rules(), n.name
        tables = X.split_route_tables(sh(n.netns, "ip", "-4", "route", "show", "table", "all"))
        assert not set(map(str, I.ABSENT_TABLES)) & set(tables), (n.name, sorted(tables))
        assert I.ABSENT_IPSET not in sh(n.netns, "ipset", "list", "-n").split()
        assert not re.search(r"ztunnel-|TPROXY|0x100/0x100|0x210", "".join(saves.values())), n.name
    for ns in [n.netns for n in plan.nodes] + [p.netns for p in plan.pods]:
        links = sh(ns, "ip", "-d", "-o", "link", "show")
        assert not re.search(r"\b(geneve|tun type tap)\b", links), (ns, links)
        assert not any(f" {d}:" in links or f" {d}@" in links for d in I.ABSENT_DEVICES), ns
    assert not [p for p in lab.health()["processes"] if p["kind"] == "geneve"]


def test_dns_capture_forwards_unknown_names_from_the_pod(lab: Lab) -> None:
    """Service names are answered by ztunnel inside the pod (the hosts file has none); a name it
    does not know goes upstream from the pod, marked, in conntrack zone 1 (raw #1 counts it), and
    kube-dns says NXDOMAIN."""
    plan = lab.plan
    src = next((p for p in plan.pods if p.mode == "ambient"), None)
    if not plan.dns_capture or src is None:
        pytest.skip("no DNS capture in this lab")
    assert "svc.cluster.local" not in sh(src.netns, "cat", f"/etc/netns/{src.netns}/hosts")
    r = lab.exec_capture(src.ref, ["getent", "hosts", "nothere.bar.svc.cluster.local"])
    assert r.returncode == 2  # not found (NXDOMAIN from kube-dns, through ztunnel)
    counters = sh(src.netns, "iptables-legacy", "-t", "raw", "-L", "ISTIO_OUTPUT", "-v", "-n", "-x")
    zone = [ln for ln in counters.splitlines() if "CT zone 1" in ln]
    assert zone and int(zone[0].split()[0]) > 0, counters
    nat = sh(src.netns, "iptables-legacy", "-t", "nat", "-L", "ISTIO_OUTPUT", "-v", "-n", "-x")
    dns = [ln for ln in nat.splitlines() if "redir ports 15053" in ln and "udp" in ln]
    assert dns and int(dns[0].split()[0]) > 0, nat


def test_status_rules_stats_logs(lab: Lab) -> None:
    st = lab.status()
    assert st["datapath"] == "inpod" and st["health"] == "up", st["problems"]
    out = subprocess.run([".venv/bin/netlab", "status", lab.name, "--json"], capture_output=True, text=True)
    assert json.loads(out.stdout)["datapath"] == "inpod"
    amb = next((p for p in lab.plan.pods if p.mode == "ambient"), None)
    if amb is not None:
        rules = lab.rules(amb.ref)
        assert "-A ISTIO_OUTPUT" in rules["iptables"] and "32764:" in rules["ip rules"]
        assert "local default dev lo table 100" in rules["routes"]
        agents = [p for p in st["processes"] if p["kind"] == "nodeagent"]
        assert len(agents) == len(lab.plan.nodes) and all(a["state"] == "running" for a in agents)
        assert any(line for line in lab.logs(f"istio-cni-{amb.node}", lines=5))
    stats = lab.stats()
    assert {p["name"] for p in stats["processes"]} == {p.name for p in lab.plan.processes}
