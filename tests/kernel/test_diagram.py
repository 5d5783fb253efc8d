"""`netlab diagram` of a running lab, and with `--trace` the observed hops drawn over it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.lab import Lab
from netlab.verify.diagram import svg_texts

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(shutil.which("dot") is None, reason="needs graphviz")]

NETLAB = [sys.executable, "-m", "netlab.cli"]


@pytest.fixture
def lab(netlab_run_dir) -> Iterator[Lab]:
    lab = Lab.up("ambient-to-sidecar", name="hc-d1", tunnel="userspace")
    try:
        yield lab
    finally:
        Lab.down_lab("hc-d1")


def test_diagram_of_running_lab(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "lab.svg"
    r = subprocess.run([*NETLAB, "diagram", "hc-d1", "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    texts = svg_texts(out.read_text())
    ET.fromstring(out.read_text())
    assert any(t.startswith("node-a · netns hc-d1-node-a") for t in texts)  # the lab's netns names, not the topology's
    for pod in lab.plan.pods:
        assert pod.ref in texts


def test_diagram_with_trace_numbers_every_hop(lab: Lab, tmp_path: Path) -> None:
    trace_mod = pytest.importorskip("netlab.verify.trace")
    if not hasattr(trace_mod, "trace"):
        pytest.skip("netlab.verify.trace.trace not written yet")
    out = tmp_path / "trace.svg"
    r = subprocess.run([*NETLAB, "diagram", "hc-d1", "-o", str(out), "--trace", "sleep", "httpbin.bar:8000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    seen = "\n".join(svg_texts(out.read_text()))
    t = subprocess.run([*NETLAB, "trace", "--lab", "hc-d1", "--from", "sleep", "--to", "httpbin.bar:8000", "--json"],
                       capture_output=True, text=True, timeout=120)
    hops = json.loads(t.stdout)["hops"]
    assert hops
    from netlab.verify.diagram import hop_anchor

    for h in hops:  # every hop that has a place in the figure carries its number
        if hop_anchor(h, lab.plan) is not None:
            assert f"({h['n']})" in seen, h
