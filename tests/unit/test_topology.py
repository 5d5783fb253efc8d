"""Malformed topologies: one line naming file and field, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netlab.cli import main
from netlab.errors import TopologyError
from netlab.topology.load import load_topology

GOOD = """\
name: t
nodes:
  - name: node-a
  - name: node-b
namespaces:
  foo: {labels: {istio.io/dataplane-mode: ambient}}
pods:
  - {name: sleep, namespace: foo, node: node-a}
"""

BAD = {
    "unknown key": (GOOD + "colour: blue\n", "colour: unknown key"),
    "unknown nested key": (GOOD.replace("{name: sleep,", "{name: sleep, nod: x,"), "pods[0].nod: unknown key"),
    "missing node": ("name: t\nnamespaces: {}\n", "nodes: required key is missing"),
    "empty nodes": ("name: t\nnodes: []\n", "at least one node"),
    "pod on undefined node": (GOOD.replace("node: node-a}", "node: node-z}"), "node 'node-z' is not defined"),
    "duplicate node": (GOOD.replace("- name: node-b", "- name: node-a"), "duplicate node 'node-a'"),
    "duplicate pod": (GOOD + "  - {name: sleep, namespace: foo, node: node-b}\n", "duplicate pod 'foo/sleep'"),
    "bad cidr": (GOOD.replace("- name: node-b", "- {name: node-b, podCidr: 10.0.0.300/24}"), "nodes[1].podCidr"),
    "non-network cidr": (GOOD.replace("- name: node-b", "- {name: node-b, podCidr: 10.0.0.1/24}"), "host bits set"),
    "name too long for an interface": (GOOD.replace("node-b", "node-with-a-long-name"), "at most 15"),
    "undefined namespace": (GOOD.replace("namespace: foo", "namespace: nope"), "namespace 'nope' is not defined"),
    "port out of range": (GOOD.replace("node: node-a}", "node: node-a, ports: [70000]}"), "pods[0].ports"),
    "wrong type": (GOOD.replace("- name: node-a", "- name: [1, 2]"), "nodes[0].name"),
    "yaml syntax": ("name: t\nnodes: [\n", "YAML syntax error"),
    "not a mapping": ("- a\n- b\n", "expected a mapping"),
    "boolean port": (GOOD.replace("node: node-a}", "node: node-a, ports: [true]}"), "pods[0].ports[0]"),
    "key with a newline": (GOOD + '"a\\nb": 1\n', "unknown key"),
    "service cidr too small": (GOOD + "network: {serviceCidr: 10.96.0.0/32}\n"
                               "services: [{name: s, namespace: foo, port: 80}]\n", "no address left"),
    "clusterIP outside serviceCidr": (GOOD + "services: [{name: s, namespace: foo, port: 80, clusterIP: 10.0.0.5}]\n",
                                      "not a usable address"),
    "duplicate vip and port": (GOOD + "services: [{name: s, namespace: foo, port: 80, clusterIP: 10.96.0.50},"
                               " {name: t, namespace: foo, port: 80, clusterIP: 10.96.0.50}]\n", "already used"),
    "pod cidr inside service cidr": (GOOD.replace("- name: node-b", "- {name: node-b, podCidr: 10.96.1.0/24}"),
                                     "overlaps network.serviceCidr"),
    "overlapping cidrs": (GOOD.replace("- name: node-a", "- {name: node-a, podCidr: 10.0.0.0/16}")
                          .replace("- name: node-b", "- {name: node-b, podCidr: 10.0.1.0/24}"), "overlaps"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_topology_is_one_line_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, expect = BAD[case]
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    rc = main(["plan", str(f)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(f) in lines[0]
    assert expect in lines[0], lines[0]
    assert "Traceback" not in err


def test_not_utf8_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bin.yaml"
    f.write_bytes(b"name: t\nnodes: [{name: \x80}]\n")
    assert main(["plan", str(f)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not UTF-8" in err


def test_good_topology_loads(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text(GOOD)
    t = load_topology(f)
    assert [n.name for n in t.nodes] == ["node-a", "node-b"]
    assert t.mode_of_pod(t.pods[0]) == "ambient"


def test_unknown_topology_name_lists_the_known_ones() -> None:
    with pytest.raises(TopologyError, match="ambient-to-sidecar"):
        load_topology("no-such-topology")


def test_cli_process_exit_status_is_2(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(BAD["unknown key"][0])
    r = subprocess.run([sys.executable, "-m", "netlab.cli", "plan", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unknown key" in r.stderr


@pytest.mark.parametrize("name", ["two-nodes", "ambient-to-sidecar", "sidecar-to-ambient", "ambient-to-ambient",
                                  "sidecar-to-sidecar", "plain-to-ambient", "coexistence"])
def test_shipped_topologies_are_valid(name: str) -> None:
    load_topology(name)


def test_sidecar_wins_over_ambient(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text(textwrap.dedent("""\
        name: t
        nodes: [{name: n1}]
        namespaces:
          both: {labels: {istio.io/dataplane-mode: ambient, istio-injection: enabled}}
          opt-out: {labels: {istio.io/dataplane-mode: ambient}}
        pods:
          - {name: a, namespace: both, node: n1}
          - {name: b, namespace: opt-out, node: n1, annotations: {ambient.istio.io/redirection: disabled}}
        """))
    t = load_topology(f)
    assert [t.mode_of_pod(p) for p in t.pods] == ["sidecar", "plain"]
