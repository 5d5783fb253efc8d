"""A sidecar learns a live enrolment through the registry it reads (issue 20): a sidecar client
calls a plain httpbin in plain TCP; once httpbin's namespace is enrolled (`netlab label`), the
same sidecar, unrestarted, sends HBONE to httpbin's 15008 (1.18 §5.2: an ambient endpoint), and
after unenrolling plain TCP again. The sidecar reads the registry through a bind mount of the
file (its mount view), which the in-place rewrite keeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.lab import Lab

pytestmark = pytest.mark.kernel

TOPOLOGY = """\
name: live-sidecar
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  sc: {labels: {istio-injection: enabled}}
  web: {}
  foo: {labels: {istio.io/dataplane-mode: ambient}}
pods:
  - {name: sleep, namespace: sc, node: node-a, app: sleep, serviceAccount: sleep}
  - {name: httpbin, namespace: web, node: node-b, app: httpbin, ports: [80]}
  - {name: other, namespace: foo, node: node-a, app: sleep}
services:
  - {name: httpbin, namespace: web, port: 8000, targetPort: 80, selector: {app: httpbin}}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    f: Path = tmp_path_factory.mktemp("topo") / "live-sidecar.yaml"
    f.write_text(TOPOLOGY)
    lab = Lab.up(str(f), name="h20ls")
    try:
        yield lab
    finally:
        lab.down()


def sidecar_leg(lab: Lab) -> tuple[str, str]:
    n = len(lab.connection_legs("sleep.sc-sidecar"))
    r = lab.exec_capture("sc/sleep", ["curl", "-s", "--max-time", "5", "http://httpbin.web:8000/ip"], timeout=20)
    assert '"origin"' in r.stdout, r
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        legs = lab.connection_legs("sleep.sc-sidecar")[n:]
        if legs:
            return legs[-1].proto, legs[-1].up_dst
        time.sleep(0.05)
    raise AssertionError("no leg on sc/sleep's sidecar")


def test_sidecar_switches_to_hbone_when_its_endpoint_is_enrolled(lab: Lab) -> None:
    httpbin = lab.plan.pod("web/httpbin")
    pid = next(p["pid"] for p in lab.health()["processes"] if p["name"] == "sleep.sc-sidecar")
    assert sidecar_leg(lab) == ("tcp", f"{httpbin.ip}:80")
    lab.label("namespace/web", "istio.io/dataplane-mode=ambient")
    assert sidecar_leg(lab) == ("hbone", f"{httpbin.ip}:15008")
    lab.label("namespace/web", "istio.io/dataplane-mode-")
    assert sidecar_leg(lab) == ("tcp", f"{httpbin.ip}:80")
    assert next(p["pid"] for p in lab.health()["processes"] if p["name"] == "sleep.sc-sidecar") == pid
