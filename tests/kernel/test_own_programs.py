"""Own programs in pods (issue 22): a pod's ``command`` runs in the pod's netns as the pod's user
(nobody), with the pod's /etc/hosts, supervised and logged like the sample apps, and ``up`` waits
for its readiness probe. The shipped ``own-programs`` topology is seed S1 with Python's
http.server behind a sidecar and a plain curl client in an ambient pod: the request must go the
whole S1 path (checked hop by hop by ``netlab trace``), and the server must see the sidecar's
127.0.0.6."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netlab.lab import Lab
from netlab.runtime import supervisor

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]
NETLAB = str(Path(sys.executable).with_name("netlab"))


def _status_ids(pid: int) -> tuple[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(\d+)", text, re.MULTILINE)
    gid = re.search(r"^Gid:\s+(\d+)", text, re.MULTILINE)
    assert uid and gid
    return uid.group(1), gid.group(1)


def test_own_server_and_curl_client_go_through_s1_and_trace_matches() -> None:
    lab = Lab.up("own-programs", name="own-s1", tunnel="userspace")
    try:
        procs = supervisor.status(lab.state_dir)["procs"]
        web, client = procs["web.bar"], procs["client.foo"]
        assert web["state"] == "running" and web["alive"] and client["alive"], procs
        # the pod's user, and the pod's /etc/hosts as seen through the program's own mount namespace
        assert _status_ids(web["pid"]) == ("65534", "65534")
        assert _status_ids(client["pid"]) == ("65534", "65534")
        hosts = Path(f"/proc/{client['pid']}/root/etc/hosts").read_text()
        assert re.search(r"^\S+\tweb\.bar ", hosts, re.MULTILINE), hosts
        # a plain curl from the ambient client pod to the program behind the sidecar
        r = lab.exec_capture("foo/client", ["curl", "-s", "--max-time", "10", "-w", "\n%{http_code}",
                                            "http://web.bar:8000/"], timeout=20)
        body, _, code = r.stdout.rpartition("\n")
        assert code == "200" and "Directory listing for /" in body, r.stdout[-500:] + r.stderr
        # logged like the sample apps: http.server's access line, from the sidecar's 127.0.0.6
        log = lab.state_dir / "logs" / "web.bar.log"
        deadline = time.monotonic() + 5
        while '"GET / HTTP/1.1" 200' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert re.search(r'^127\.0\.0\.6 - - \[.*\] "GET / HTTP/1\.1" 200', log.read_text(), re.MULTILINE), log.read_text()[-800:]
        # and every hop of S1, as `netlab trace` (the real CLI) checks it against the contract
        t = subprocess.run([NETLAB, "trace", "--lab", lab.name, "--from", "foo/client", "--to", "web.bar:8000"],
                           capture_output=True, text=True, timeout=60)
        assert t.returncode == 0 and "contract S1: MATCH" in t.stdout, t.stdout + t.stderr
        seen = re.findall(r"^\s*\((\w+)\) ", t.stdout, flags=re.MULTILINE)
        assert list(dict.fromkeys(seen)) == [str(i) for i in range(1, 9)], t.stdout
    finally:
        Lab.down_lab("own-s1")


def test_a_command_that_dies_at_once_fails_up_with_its_log_and_leaves_nothing(tmp_path: Path) -> None:
    topo = tmp_path / "dies.yaml"
    topo.write_text("""\
name: dies
nodes: [{name: n1}]
namespaces: {ns: {}}
pods:
  - {name: p, namespace: ns, node: n1, app: p, command: [sh, -c, "echo no config here >&2; exit 3"]}
""")
    r = subprocess.run([NETLAB, "up", str(topo), "--name", "own-dies", "-q"], capture_output=True, text=True, timeout=120)
    try:
        assert r.returncode != 0
        assert "'p.ns'" in r.stderr and "exit 3" in r.stderr and "no config here" in r.stderr, r.stderr
        assert "own-dies" not in Lab.running()
        assert not any(n.startswith("own-dies-") for n in os.listdir("/run/netns"))
    finally:
        subprocess.run([NETLAB, "down", "own-dies"], capture_output=True, timeout=60)
