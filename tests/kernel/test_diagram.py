"""`netlab diagram LAB -o F.svg --trace SRC DST` for every path of every shipped topology, under
both datapaths: exit 0, and the SVG carries every hop (a badge per observed hop, the seed's number on each contract hop)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.lab import Lab
from netlab.topology.load import load_topology
from netlab.verify.diagram import svg_texts

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

NETLAB = [sys.executable, "-m", "netlab.cli"]
TOPOLOGIES = sorted(p.stem for p in (Path(__file__).parents[2] / "topologies").glob("*.yaml")
                    if load_topology(p.stem).paths)


@pytest.fixture(params=[(t, dp) for dp in ("istio-1.18", "inpod") for t in TOPOLOGIES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def lab(request: pytest.FixtureRequest, netlab_run_dir: object) -> Iterator[Lab]:
    """Each topology under both datapaths: an inpod lab is drawn with its own contract's numbers."""
    topology, datapath = request.param
    name = ("hd-" if datapath == "istio-1.18" else "hdi-") + topology[:12].rstrip("-")
    lab = Lab.up(topology, name=name, tunnel="userspace", datapath=datapath)
    try:
        yield lab
    finally:
        Lab.down_lab(name)


def test_every_path_draws_with_every_hop_number(lab: Lab, tmp_path: Path) -> None:
    for path in lab.plan.paths:
        out = tmp_path / f"{path.name}.svg"
        r = subprocess.run([*NETLAB, "diagram", lab.name, "-o", str(out), "--trace", path.from_, path.to],
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, (path.name, r.stderr)
        m = re.search(r", (\d+) hops \((\d+) drawn\)", r.stdout)
        assert m and m.group(1) == m.group(2), r.stdout  # every observed hop has a place in the figure
        svg = out.read_text()
        ET.fromstring(svg)
        for n in range(1, int(m.group(1)) + 1):
            assert re.search(rf'class="badge[^"]*" data-hop="{n}"', svg), (path.name, n)
        texts = svg_texts(svg)
        assert "MATCH" in texts[0] and "MISMATCH" not in texts[0], (path.name, texts[0])
        for h in path.hops:  # the trace matched its contract, so each seed number is drawn
            assert (f"({h.n})" in texts) != h.absent, (path.name, h.n)  # inpod S3: no (w1), no (w3)


def test_png_of_a_trace(netlab_run_dir: object, tmp_path: Path) -> None:
    Lab.up("ambient-to-sidecar", name="hd-png", tunnel="userspace")
    try:
        out = tmp_path / "s1.png"
        r = subprocess.run([*NETLAB, "diagram", "hd-png", "-o", str(out), "--trace", "foo/sleep", "httpbin.bar:8000"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        Lab.down_lab("hd-png")
