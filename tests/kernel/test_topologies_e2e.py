"""Every shipped topology, end to end: for each request path it declares, curl from the client pod
to the service by name gets the expected status and body, and the destination app saw the source
Istio would show it (§7): the client pod's IP, the waypoint's, or 127.0.0.6 behind a sidecar."""

from __future__ import annotations

import json
import os

import pytest

from netlab.lab import Lab
from netlab.topology.load import load_topology

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]

TOPOLOGIES = ["ambient-to-sidecar", "sidecar-to-ambient", "ambient-to-ambient", "sidecar-to-sidecar",
              "plain-to-ambient", "coexistence"]


def curl(lab: Lab, pod: str, url: str) -> tuple[int, str]:
    r = lab.exec_capture(pod, ["curl", "-s", "--max-time", "10", "-w", "\n%{http_code}", url], timeout=20)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_path_of_the_topology(topology: str) -> None:
    topo = load_topology(topology)
    assert topo.paths, f"{topology} declares no request paths"
    lab = Lab.up(topology, name=f"e2e-{topology}"[:40], tunnel="userspace")
    try:
        plan = lab.plan
        failures = []
        for path in topo.paths:
            client = plan.pod(path.from_)
            status, body = curl(lab, path.from_, f"http://{path.to}{path.url}")
            if status != path.expect_status:
                failures.append(f"{path.name}: status {status}, expected {path.expect_status} ({body[:200]!r})")
                continue
            if path.expect_body and path.expect_body not in body:
                failures.append(f"{path.name}: body {body[:200]!r} lacks {path.expect_body!r}")
            # where the request landed, and which source the app saw there
            host = path.to.split(":")[0]
            svc_name, svc_ns = host.split(".")[:2]
            svc = next(s for s in plan.services if s.name == svc_name and s.namespace == svc_ns)
            dest = plan.pod(svc.endpoints[0])
            if dest.app == "httpbin":
                st, ip_body = curl(lab, path.from_, f"http://{path.to}/ip")
                seen = json.loads(ip_body)["origin"] if st == 200 else f"status {st}"
            else:
                seen = _last_client_seen(lab, dest.ref)
            want = {"client": client.ip, "local": "127.0.0.6",
                    "waypoint": next((w.ip for w in plan.pods if w.mode == "waypoint" and w.namespace == dest.namespace), "?")}[path.source_seen]
            if seen != want:
                failures.append(f"{path.name}: {dest.ref} saw source {seen}, expected {path.source_seen} = {want}")
        assert not failures, "\n".join(failures)
    finally:
        Lab.down_lab(lab.name)


def _last_client_seen(lab: Lab, pod_ref: str) -> str:
    """The client address in the app's last request log line (apps log one JSON line per request)."""
    p = lab.plan.pod(pod_ref)
    log = lab.state_dir / "logs" / f"{p.name}.{p.namespace}.log"
    for line in reversed(log.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key in ("client", "client_ip", "origin", "peer"):
            if key in rec:
                return str(rec[key]).rsplit(":", 1)[0] if str(rec[key]).count(":") == 1 else str(rec[key])
    return "?"


def test_two_labs_of_one_topology_do_not_collide() -> None:
    a = Lab.up("ambient-to-sidecar", name="e2e-twin-a", tunnel="userspace")
    try:
        b = Lab.up("ambient-to-sidecar", name="e2e-twin-b", tunnel="userspace")
        try:
            for lab in (a, b):
                status, body = curl(lab, "foo/sleep", "http://httpbin.bar:8000/headers")
                assert status == 200 and '"headers"' in body
        finally:
            Lab.down_lab(b.name)
    finally:
        Lab.down_lab(a.name)
