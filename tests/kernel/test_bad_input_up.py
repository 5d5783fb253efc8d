"""`netlab up` with hostile input (issue 17, items 6-10, 12d-e), as a shell sees it: exit status 2,
one line on stderr naming the file and the field, no traceback, and nothing made (no netns, no
state directory, no /etc/netns entry)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from netlab import netns as ns

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (`netlab up`)")]
NETLAB = [sys.executable, "-m", "netlab.cli"]
LAB = "hxbad"

BASE = """\
name: hxtopo
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  foo: {labels: {istio.io/dataplane-mode: ambient}}
pods:
  - {name: sleep, namespace: foo, node: node-a}
"""

# case: (file text, --name or None for the default, what the line must name)
CASES: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "7 pod name with a trailing newline": (BASE.replace("{name: sleep,", '{name: "sleep\\n",'), None, ("pods[0].name",)),
    "7 empty --name": (BASE, "", ("lab name is empty",)),
    "7 --name with a trailing newline": (BASE, "x\n", ("lab name",)),
    "8 300-character waypoint name": (BASE + "waypoints: [{namespace: foo, node: node-b, name: " + "w" * 300 + "}]\n",
                                      LAB, ("waypoints[0].name", "300 characters")),
    "9 waypoint name with a slash": (BASE + "waypoints: [{namespace: foo, node: node-b, name: a/b}]\n", LAB,
                                     ("waypoints[0].name",)),
    "9 unicode serviceAccount": (BASE.replace("node: node-a}", "node: node-a, serviceAccount: sérvice}"), LAB,
                                 ("pods[0].serviceAccount",)),
    "9 300-character serviceAccount": (BASE.replace("node: node-a}", "node: node-a, serviceAccount: " + "s" * 300 + "}"),
                                       LAB, ("pods[0].serviceAccount", "300 characters")),
    "9 YAML nested 3,000 deep": (BASE + "x: " + "[" * 3000 + "]" * 3000 + "\n", LAB, ("nest",)),
    "9 5,000-digit port": (BASE.replace("node: node-a}", "node: node-a, ports: [" + "1" * 5000 + "]}"), LAB,
                           ("pods[0].ports[0]",)),
    "10 serviceAccount x/y": (BASE.replace("node: node-a}", "node: node-a, serviceAccount: x/y}"), LAB,
                              ("pods[0].serviceAccount",)),
    "12d duplicate key": (BASE.replace("{name: sleep,", "{name: sleep, node: node-b,"), LAB,
                          (":6:", "pods[0].node: duplicate key")),
    "6 pod CIDR over Istio's tunnel link net": (BASE.replace("{name: node-b}", "{name: node-b, podCidr: 192.168.127.0/24}"),
                                                LAB, ("nodes[1].podCidr", "istioout")),
    "6 /30 fabric for two nodes": (BASE + "network: {fabric: 172.172.0.0/30}\n", LAB, ("network.fabric", "too small")),
    "6 fabric over the service range": (BASE + "network: {fabric: 10.96.0.0/24}\n", LAB,
                                        ("network.fabric", "network.serviceCidr")),
}


def _etc_netns() -> list[str]:
    return sorted(os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else []


def _up(target: str, name: str | None, run: Path) -> subprocess.CompletedProcess[str]:
    args = [*NETLAB, "up", target, "-q", "--tunnel", "userspace"] + ([f"--name={name}"] if name is not None else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "NETLAB_RUN_DIR": str(run)})


def _check(r: subprocess.CompletedProcess[str], names_file: str, expect: tuple[str, ...]) -> None:
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("netlab up: "), r.stderr[-2000:]
    assert names_file in lines[0], lines[0]
    for e in expect:
        assert e in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_up_with_bad_input_is_one_line_exit_2_and_makes_nothing(case: str, tmp_path: Path) -> None:
    text, name, expect = CASES[case]
    run = tmp_path / "run"
    f = tmp_path / "topo.yaml"
    f.write_text(text)
    before, etc_before = set(ns.list_netns()), _etc_netns()
    r = _up(str(f), name, run)
    made = [n for n in set(ns.list_netns()) - before]
    if r.returncode == 0:  # only on a failure: stop what that `up` started, for the next case
        subprocess.run([*NETLAB, "down", "--all"], capture_output=True, timeout=120, check=False,
                       env={**os.environ, "NETLAB_RUN_DIR": str(run)})
    for n in made:
        subprocess.run(["ip", "netns", "delete", n], capture_output=True, check=False)
    # --name cases name the option's value, not the file
    _check(r, str(f) if name not in ("", "x\n") else "lab name", expect)
    assert made == []
    assert not run.exists() or os.listdir(run) == []
    assert _etc_netns() == etc_before


def test_up_of_a_directory_says_it_is_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "topo.yaml"
    d.mkdir()
    before = set(ns.list_netns())
    r = _up(str(d), LAB, tmp_path / "run")
    _check(r, str(d), ("is a directory",))
    assert set(ns.list_netns()) == before and not (tmp_path / "run" / LAB).exists()
