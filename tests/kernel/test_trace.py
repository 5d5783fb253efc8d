"""`netlab trace` on the seed article's three paths, in real labs with every proxy running.

Each test runs the real CLI (a subprocess, like a user) and checks that it prints the seed's
numbered hops and exits 0; then breaks the datapath the way the issue describes (table 101 on
node A loses its default route) and checks that trace exits 1 naming the hop that diverged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from netlab.lab import Lab
from netlab.verify.trace import trace

pytestmark = pytest.mark.kernel
NETLAB = str(Path(sys.executable).with_name("netlab"))
HOP_KEYS = {"n", "seed_n", "netns", "node", "iface", "dir", "src", "dst", "proto", "encap", "rules", "route", "proxy"}


@contextmanager
def lab_up(topology: str, name: str) -> Iterator[Lab]:
    lab = Lab.up(topology, name=name, tunnel="userspace")
    try:
        yield lab
    finally:
        Lab.down_lab(name)


def run_trace(lab: str, src: str, dst: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NETLAB, "trace", "--lab", lab, "--from", src, "--to", dst, *extra],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())


def labels(out: str) -> list[str]:
    """The seed numbers printed at the start of hop lines, in order, e.g. ['1', '2', ...]."""
    return re.findall(r"^\s*\((\w+)\) ", out, flags=re.M)


def test_trace_s1_prints_the_seed_hops_and_exits_0() -> None:
    with lab_up("ambient-to-sidecar", "ht-t1") as lab:
        r = run_trace(lab.name, "foo/sleep", "httpbin.bar:8000")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "contract S1: MATCH" in r.stdout
        got = labels(r.stdout)
        assert list(dict.fromkeys(got)) == [str(i) for i in range(1, 9)], r.stdout
        # the evidence behind the numbers: the mark rule, table 101, Geneve VNI 1001, TPROXY, the proxies
        assert "§1.5 mangle ztunnel-PREROUTING #15" in r.stdout and "-> table 101:" in r.stdout
        assert "geneve vni 1001" in r.stdout and "§2.2 mangle PREROUTING #2" in r.stdout
        assert re.search(r"\(5\) ztunnel:node-a\s+ztunnel:15001", r.stdout)
        assert re.search(r"\(8\) pod:bar/httpbin\s+sidecar:15006", r.stdout)

        d = json.loads(run_trace(lab.name, "foo/sleep", "httpbin.bar:8000", "--json").stdout)
        assert d["match"] is True and d["contract"] == "S1" and d["status"] == 200
        assert all(HOP_KEYS <= h.keys() for h in d["hops"])
        tun = next(h for h in d["hops"] if h["iface"] == "istioout")
        assert tun["encap"]["vni"] == 1001 and tun["encap"]["outer_dst"] == lab.plan.pod("istio-system/ztunnel-node-a").ip


def test_trace_s1_broken_table_101_exits_1_naming_hop_2() -> None:
    with lab_up("ambient-to-sidecar", "ht-t1b") as lab:
        node_a = lab.plan.node("node-a").netns
        subprocess.run(["ip", "netns", "exec", node_a, "ip", "route", "del", "default", "table", "101"], check=True)
        r = run_trace(lab.name, "foo/sleep", "httpbin.bar:8000")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "contract S1: MISMATCH: hop (2) diverged: expected node:node-a veth(foo/sleep) in" in r.stdout
        assert "not table 101" in r.stdout
        # the API says the same as data
        res = trace(lab, "foo/sleep", "httpbin.bar:8000")
        assert res.matched is False and res.divergence is not None and res.divergence.expected.n == "2"
        assert res.divergence.observed is not None and res.divergence.observed.iface_sym == "veth(foo/sleep)"


def test_trace_s2_and_s3_print_the_seed_hops_and_exit_0() -> None:
    with lab_up("sidecar-to-ambient", "ht-t2") as lab:
        r = run_trace(lab.name, "foo/sleep", "httpbin.bar-1:8000")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "contract S2: MATCH" in r.stdout
        assert list(dict.fromkeys(labels(r.stdout))) == [str(i) for i in range(1, 10)], r.stdout
        assert re.search(r"\(6\) node:node-b\s+istioin\s+out", r.stdout)
        assert re.search(r"\(8\) ztunnel:node-b\s+ztunnel:15008", r.stdout)

        r = run_trace(lab.name, "foo/sleep", "helloworld.bar-2:5000")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "contract S3: MATCH" in r.stdout
        assert list(dict.fromkeys(labels(r.stdout))) == ["1", "2", "3", "4", "w1", "w2", "w3", "w4",
                                                         "5", "6", "7", "8", "9"], r.stdout
        assert re.search(r"\(w3\) waypoint:bar-2/waypoint\s+waypoint:15008", r.stdout)
        assert re.search(r"\(6\) node:node-d\s+istioin\s+out", r.stdout)

        # S2's contract checked against S3's request: the HBONE goes to node C, not node B
        r = run_trace(lab.name, "foo/sleep", "helloworld.bar-2:5000", "--contract", "S2")
        assert r.returncode == 1 and "hop (5) diverged" in r.stdout, r.stdout

        # the 1 s budget: a trace never imports scapy (0.5-1 s by itself)
        probe = ("import sys; from netlab.lab import Lab; from netlab.verify.trace import trace; "
                 f"r = trace(Lab.attach({lab.name!r}), 'foo/sleep', 'httpbin.bar-1:8000'); "
                 "print(r.matched, sorted(m for m in sys.modules if m.split('.')[0] == 'scapy'))")
        p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        assert p.stdout.split() == ["True", "[]"], p.stdout + p.stderr


def test_coexistence_every_pairing_matches_its_hop_contract() -> None:
    """One lab with every client kind (ambient, sidecar, plain) against every server kind (sidecar,
    ambient, ambient behind a waypoint): each request follows its contract's hops, end to end."""
    from netlab.topology.load import load_topology

    paths = load_topology("coexistence").paths
    assert len(paths) == 8 and all(p.hops for p in paths)
    with lab_up("coexistence", "ht-coex") as lab:
        failures = []
        for path in paths:
            res = trace(lab, path.from_, path.to)
            if res.contract is None or res.contract.name != path.name or not res.matched or res.status != 200:
                failures.append(f"{path.name}: status {res.status}, contract "
                                f"{res.contract.name if res.contract else None}, matched {res.matched}: "
                                f"{res.divergence or res.error}\n{res.render()}")
        assert not failures, "\n\n".join(failures)
