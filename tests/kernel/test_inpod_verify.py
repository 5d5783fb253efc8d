"""The verify side of the in-pod datapath (issue 19), through the real CLI as a user runs it:

* ``netlab up ambient-to-sidecar --datapath inpod``: curl by service name answers 200 with the
  right body; ``netlab trace`` of S1 follows the inpod contract (the SYN REDIRECTed to 15001
  inside sleep's netns, ztunnel's listener *in the pod*, HBONE from the pod's own IP with mark
  0x539, the sidecar's 15008) and exits 0; with one pod-netns rule deleted it exits 1 naming hop 1;
* ``exec``, ``capture``, ``stats``, ``logs``, ``rules`` and ``status --json`` on an inpod lab;
* between nodes, A1's request is TLS on 15008 only (its plaintext nowhere in the capture) and the
  app sees the client pod's own IP;
* ``netlab compare`` of S1 and S3: two labs, both contracts kept, the hop lists side by side and
  what disappeared/appeared; the labs gone afterwards (and kept with ``--keep``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.lab import Lab
from netlab.verify.compare import CELL

pytestmark = pytest.mark.kernel
NETLAB = [sys.executable, "-m", "netlab.cli"]
OUT6 = ["!", "-d", "127.0.0.1/32", "-p", "tcp", "-m", "mark", "!", "--mark", "0x539/0xfff", "-j", "REDIRECT",
        "--to-ports", "15001"]  # §1.4 nat ISTIO_OUTPUT #6


def netlab(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETLAB, *argv], capture_output=True, text=True, timeout=timeout)


def labels(out: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"^\s*\((\w+)\) ", out, flags=re.M)))


@pytest.fixture(scope="module")
def s1() -> Iterator[str]:
    r = netlab("up", "ambient-to-sidecar", "--name", "iv-s1", "--datapath", "inpod", "-q")
    assert r.returncode == 0, r.stderr
    try:
        yield "iv-s1"
    finally:
        Lab.down_lab("iv-s1")


def test_s1_inpod_answers_and_traces_its_contract_and_a_deleted_rule_names_hop_1(s1: str) -> None:
    r = netlab("exec", "--lab", s1, "sleep", "--", "curl", "-s", "-w", "\n%{http_code}", "http://httpbin.bar:8000/headers")
    body, _, code = r.stdout.rpartition("\n")
    assert code == "200" and '"Host": "httpbin.bar:8000"' in body, r.stdout + r.stderr

    r = netlab("trace", "--lab", s1, "--from", "foo/sleep", "--to", "httpbin.bar:8000")
    assert r.returncode == 0 and "contract S1: MATCH" in r.stdout, r.stdout + r.stderr
    assert labels(r.stdout) == ["1", "5", "6", "7", "8"], r.stdout  # the seed's 2-4 (node mark, istioout, pistioout) are gone
    assert re.search(r"\(1\) pod:foo/sleep\s+lo\s+out\s+\S+ -> 127\.0\.0\.1:15001\n\s+rules: §1\.4 nat ISTIO_OUTPUT #6\n", r.stdout)
    assert re.search(r"\(5\) pod:foo/sleep\s+ztunnel:15001 .* hbone", r.stdout)
    assert re.search(r"\(6\) pod:foo/sleep\s+eth0\s+out .*:15008\n\s+mark 0x539\n", r.stdout)
    assert re.search(r"\(7\) pod:bar/httpbin\s+eth0\s+in .*\n\s+rules: .*§4\.2 nat ISTIO_INBOUND #1", r.stdout)
    assert "istioout" not in r.stdout and "geneve" not in r.stdout and "ztunnel:node-a" not in r.stdout
    d = json.loads(netlab("trace", "--lab", s1, "--from", "foo/sleep", "--to", "httpbin.bar:8000", "--json").stdout)
    assert d["match"] is True and d["status"] == 200
    assert next(h for h in d["hops"] if h["kind"] == "proxy")["netns"] == Lab.attach(s1).plan.pod("foo/sleep").netns

    sleep_ns = Lab.attach(s1).plan.pod("foo/sleep").netns
    ipt = ["ip", "netns", "exec", sleep_ns, "iptables-legacy", "-t", "nat"]
    subprocess.run([*ipt, "-D", "ISTIO_OUTPUT", *OUT6], check=True)
    try:
        r = netlab("trace", "--lab", s1, "--from", "foo/sleep", "--to", "httpbin.bar:8000")
        assert r.returncode == 1, r.stdout + r.stderr
        assert ("contract S1: MISMATCH: hop (1) diverged: expected pod:foo/sleep lo out :15001 "
                "rules §1.4 nat ISTIO_OUTPUT #6; observed pod:foo/sleep eth0 out") in r.stdout, r.stdout
    finally:
        subprocess.run([*ipt, "-A", "ISTIO_OUTPUT", *OUT6], check=True)
    assert netlab("trace", "--lab", s1, "--from", "foo/sleep", "--to", "httpbin.bar:8000").returncode == 0


def test_status_exec_capture_stats_logs_rules_on_an_inpod_lab(s1: str, tmp_path: Path) -> None:
    st = json.loads(netlab("status", s1, "--json").stdout)
    assert st["datapath"] == "inpod" and st["health"] == "up"
    r = netlab("exec", "--lab", s1, "sleep", "--", "cat", "/etc/resolv.conf")
    assert r.returncode == 0 and "nameserver" in r.stdout  # kube-dns's VIP: DNS capture is on
    f = tmp_path / "lo.pcapng"
    r = netlab("capture", "--lab", s1, "--iface", "sleep:lo", "-w", str(f), "--",
               *NETLAB, "exec", "--lab", s1, "sleep", "--", "curl", "-s", "-o", "/dev/null", "http://httpbin.bar:8000/get")
    assert r.returncode == 0 and f"wrote {f}:" in r.stderr, r.stderr
    raw = f.read_bytes()
    assert raw[:4] == b"\x0a\x0d\x0d\x0a" and b"GET /get" in raw  # the app's request, to ztunnel over lo
    if shutil.which("tshark"):
        rows = subprocess.run(["tshark", "-r", str(f), "-Y", "tcp.flags.syn == 1 && tcp.flags.ack == 0", "-T", "fields",
                               "-e", "ip.dst", "-e", "tcp.dstport"], capture_output=True, text=True, timeout=60).stdout.split("\n")
        assert "127.0.0.1\t15001" in rows, rows  # REDIRECTed in the pod (§1.4 nat ISTIO_OUTPUT #6)
    stats = json.loads(netlab("stats", "--lab", s1, "--json").stdout)
    assert {"ztunnel-node-a", "istio-cni-node-a"} <= {p["name"] for p in stats["processes"]}
    r = netlab("logs", "--lab", s1, "--conn", "ztunnel-node-a", "--json")
    assert r.returncode == 0 and any(leg.get("extra", {}).get("pod") == "foo/sleep" for leg in json.loads(r.stdout)), r.stdout
    r = netlab("rules", "--lab", s1, "sleep")
    assert r.returncode == 0 and "ISTIO_PRERT" in r.stdout and "32764:" in r.stdout and "fwmark 0x111/0xfff" in r.stdout
    r = netlab("rules", "--lab", s1, "node-a")
    assert r.returncode == 0 and "istioout" not in r.stdout and "ISTIO_POSTRT" in r.stdout


def test_between_nodes_only_tls_on_15008_and_the_app_sees_the_client_pod(tmp_path: Path) -> None:
    name = "iv-a1"
    assert netlab("up", "ambient-to-ambient", "--name", name, "--datapath", "inpod", "-q").returncode == 0
    try:
        plan = Lab.attach(name).plan
        sleep, httpbin = plan.pod("foo/sleep"), plan.pod("bar/httpbin")
        token = uuid.uuid4().hex
        f = tmp_path / "a1.pcapng"
        r = netlab("capture", "--lab", name, "--iface", "node-a:eth0", "--iface", "node-b:eth0", "-w", str(f), "--",
                   *NETLAB, "exec", "--lab", name, "sleep", "--", "curl", "-s", "-H", f"x-secret: {token}",
                   "http://httpbin.bar:8000/anything")
        assert r.returncode == 0, r.stderr
        echo = json.loads(r.stdout)
        assert echo["headers"].get("X-Secret", echo["headers"].get("x-secret")) == token  # it did arrive
        assert echo["origin"] == sleep.ip  # the app sees the client pod's own IP (§5 A1)
        raw = f.read_bytes()
        assert token.encode() not in raw and b"GET /anything" not in raw and b"x-secret" not in raw.lower()
        if shutil.which("tshark"):
            def rows(*args: str) -> list[str]:
                p = subprocess.run(["tshark", "-r", str(f), "-d", "tcp.port==15008,tls", *args], capture_output=True,
                                   text=True, timeout=60)
                assert p.returncode == 0, p.stderr
                return [x for x in p.stdout.splitlines() if x]
            hello = rows("-Y", "tls.handshake.type == 1", "-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.dstport")
            assert hello and set(hello) == {f"{sleep.ip}\t{httpbin.ip}\t15008"}, hello
            assert rows("-Y", "tcp.len > 0 && !(tcp.port == 15008)") == []  # no payload outside 15008
            assert rows("-Y", "http") == []
            assert rows("-Y", "tls.app_data")  # the request and its answer: encrypted application data
    finally:
        Lab.down_lab(name)


def test_compare_s1_json_and_s3_text_and_html(tmp_path: Path) -> None:
    r = netlab("compare", "ambient-to-sidecar", "--name", "iv-c1", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["labs"] == {"istio-1.18": "iv-c1-1-18", "inpod": "iv-c1-inpod"} and d["match"] is True and not d["kept"]
    assert [d["traces"][dp]["contract"] for dp in ("istio-1.18", "inpod")] == ["S1", "S1"]
    gone, came = d["disappeared"], d["appeared"]
    assert {"node:node-a istioout", "ztunnel:node-a pistioout"} <= set(gone["devices"])
    assert "node:node-a: §1.5 mangle ztunnel-PREROUTING #15" in gone["rules"]
    assert "pod:foo/sleep: §1.4 nat ISTIO_OUTPUT #6" in came["rules"]
    assert "node:node-a veth(foo/sleep) in: 0x100" in gone["marks"] and "pod:foo/sleep eth0 out: 0x539" in came["marks"]
    assert any("table 101" in t for t in gone["tables"])
    # ztunnel's listener moved into sleep's pod; the tunnel label makes the sidecar take HBONE on 15008
    assert gone["listeners"] == ["pod:bar/httpbin sidecar:15006", "ztunnel:node-a ztunnel:15001"]
    assert came["listeners"] == ["pod:bar/httpbin sidecar:15008", "pod:foo/sleep ztunnel:15001"]
    assert not set(Lab.running()) & {"iv-c1-1-18", "iv-c1-inpod"}  # both torn down

    html = tmp_path / "s3.html"
    r = netlab("compare", "sidecar-to-ambient", "--path", "S3", "--name", "iv-c3", "--keep", "--html", str(html), timeout=300)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "MATCH" in r.stdout.splitlines()[1] and "MISMATCH" not in r.stdout
        rows = [ln for ln in r.stdout.splitlines() if ln[CELL:CELL + 2] == " |"]
        left, right = [ln[:CELL] for ln in rows], [ln[CELL + 3:] for ln in rows]
        assert any("(w3) waypoint:bar-2/waypoint waypoint:15008" in x for x in left)
        assert not any("waypoint" in x for x in right)  # inpod: the sidecar goes straight to helloworld
        assert any("(8) pod:bar-2/helloworld ztunnel:15008" in x for x in right)
        assert re.search(r"listeners: waypoint:bar-2/waypoint waypoint:15008\n\s+ztunnel:node-d ztunnel:15008\n", r.stdout)
        assert "labs kept: iv-c3-1-18, iv-c3-inpod" in r.stdout
        for lab in ("iv-c3-1-18", "iv-c3-inpod"):
            assert json.loads(netlab("status", lab, "--json").stdout)["health"] == "up"
        page = html.read_text()
        assert page.count("<svg") == 2 and "iv-c3-1-18" in page and "iv-c3-inpod" in page
    finally:
        for lab in ("iv-c3-1-18", "iv-c3-inpod"):
            Lab.down_lab(lab)
