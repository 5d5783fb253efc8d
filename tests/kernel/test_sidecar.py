"""Sidecar to sidecar in real namespaces: REDIRECT -> 15001 -> plain TCP -> REDIRECT -> 15006 -> app.

Asserts what the app and the proxies really saw: the HTTP status and body, httpbin's ``origin``
(127.0.0.6, Envoy's inbound bind), and the two connection-log legs joined by their 4-tuple.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from netlab.lab import Lab
from netlab.mesh.connlog import read_legs

pytestmark = pytest.mark.kernel


def wait_legs(path: Path, n: int = 1, timeout: float = 5.0) -> list[dict]:
    """Legs are written when a connection ends, a moment after curl returned."""
    deadline = time.monotonic() + timeout
    while True:
        legs = read_legs(path)
        if len(legs) >= n or time.monotonic() > deadline:
            return legs
        time.sleep(0.05)


def curl(lab: Lab, pod: str, url: str) -> tuple[int, str]:
    r = lab.exec_capture(pod, ["curl", "-s", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", url], timeout=15)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


@pytest.fixture
def s2s():
    lab = Lab.up("sidecar-to-sidecar", name="hs-s2s", tunnel="userspace")
    try:
        yield lab
    finally:
        Lab.down_lab("hs-s2s")


def test_sidecar_to_sidecar_app_sees_127_0_0_6_and_legs_join(s2s: Lab) -> None:
    sleep, httpbin = s2s.plan.pod("foo/sleep"), s2s.plan.pod("bar/httpbin")
    code, body = curl(s2s, "foo/sleep", "http://httpbin.bar:8000/ip")
    assert code == 200, body
    assert json.loads(body)["origin"] == "127.0.0.6"

    out_path = s2s.state_dir / "conn" / "sleep.foo-sidecar.jsonl"
    in_path = s2s.state_dir / "conn" / "httpbin.bar-sidecar.jsonl"
    out = [leg for leg in wait_legs(out_path) if leg["listener"] == "outbound:15001"]
    inb = [leg for leg in wait_legs(in_path) if leg["listener"] == "inbound:15006"]
    assert len(out) == 1 and len(inb) == 1, (out, inb)
    o, i = out[0], inb[0]
    svc = next(s for s in s2s.plan.services if s.name == "httpbin")
    assert o["orig_dst"] == f"{svc.vip}:8000"  # the app dialled the VIP
    assert o["proto"] == "tcp" and o["up_dst"] == f"{httpbin.ip}:80"  # httpbin has no tunnel label
    assert o["up_src"].startswith(sleep.ip + ":")
    assert o["src"].startswith(sleep.ip + ":")  # REDIRECT keeps the app's source
    # 4-tuple join: sleep's upstream connection is httpbin's downstream connection
    assert i["src"] == o["up_src"] and i["orig_dst"] == o["up_dst"]
    assert i["up_dst"] == f"{httpbin.ip}:80" and i["up_src"].startswith("127.0.0.6:")
    assert o["outcome"] == i["outcome"] == "ok"
    assert o["bytes_down"] == i["bytes_down"] > 0 and o["bytes_up"] == i["bytes_up"] > 0


def test_sidecar_readiness_and_passthrough(s2s: Lab) -> None:
    r = s2s.exec_capture("foo/sleep", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                       "http://127.0.0.1:15021/healthz/ready"], timeout=10)
    assert r.stdout == "200"
    # pod IP of httpbin, not a VIP: still resolved (pod IP -> itself) and proxied
    httpbin = s2s.plan.pod("bar/httpbin")
    code, body = curl(s2s, "foo/sleep", f"http://{httpbin.ip}:80/ip")
    assert code == 200 and json.loads(body)["origin"] == "127.0.0.6"


NATIVE_TOPOLOGY = """\
name: hs-native
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  foo: {labels: {istio-injection: enabled}}
  bar: {labels: {istio-injection: enabled}}
pods:
  - {name: sleep, namespace: foo, node: node-a, app: sleep, serviceAccount: sleep}
  - {name: httpbin, namespace: bar, node: node-b, app: httpbin, serviceAccount: httpbin, ports: [80],
     labels: {networking.istio.io/tunnel: http}}
services:
  - {name: httpbin, namespace: bar, port: 8000, targetPort: 80, selector: {app: httpbin}}
"""


def test_native_hbone_sidecar_receives_hbone_on_15008(tmp_path: Path) -> None:
    """httpbin labelled tunnel=http: sleep's sidecar speaks HBONE to httpbin:15008 (never captured, §6),
    httpbin's sidecar terminates it and still hands the request to the app from 127.0.0.6."""
    topo = tmp_path / "native.yaml"
    topo.write_text(NATIVE_TOPOLOGY)
    lab = Lab.up(str(topo), name="hs-native", tunnel="userspace")
    try:
        httpbin = lab.plan.pod("bar/httpbin")
        code, body = curl(lab, "foo/sleep", "http://httpbin.bar:8000/ip")
        assert code == 200 and json.loads(body)["origin"] == "127.0.0.6"
        (o,) = wait_legs(lab.state_dir / "conn" / "sleep.foo-sidecar.jsonl")
        (i,) = wait_legs(lab.state_dir / "conn" / "httpbin.bar-sidecar.jsonl")
        assert o["proto"] == "hbone" and o["up_dst"] == f"{httpbin.ip}:15008" and o["authority"] == f"{httpbin.ip}:80"
        assert o["dst_id"].endswith("/ns/bar/sa/httpbin")
        assert i["listener"] == "inbound:15008" and i["src"] == o["up_src"] and i["src_id"].endswith("/ns/foo/sa/sleep")
        assert i["up_src"].startswith("127.0.0.6:") and i["bytes_down"] == o["bytes_down"]
    finally:
        Lab.down_lab("hs-native")
