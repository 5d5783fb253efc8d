"""An authorization policy from the topology is enforced by ztunnel and shown by `netlab trace`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from netlab.lab import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]
TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"


def test_trace_names_the_denying_policy(tmp_path: Path) -> None:
    text = (TOPOLOGIES / "ambient-to-ambient.yaml").read_text()
    text += "policies:\n  - {name: deny-foo, namespace: bar, action: DENY, from: [ns/foo]}\n"
    topo = tmp_path / "ambient-to-ambient.yaml"  # same name: the hop contracts still apply
    topo.write_text(text)
    Lab.up(topo, name="tpol", tunnel="userspace")
    try:
        r = subprocess.run([sys.executable, "-m", "netlab.cli", "trace", "--lab", "tpol", "--from", "foo/sleep",
                            "--to", "httpbin.bar:8000"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stdout + r.stderr  # the request no longer completes as contracted
        assert "DENIED by policy deny-foo" in r.stdout, r.stdout
        assert "ztunnel-node-b inbound:15008: 401" in r.stdout, r.stdout
    finally:
        Lab.down_lab("tpol")
