"""State conflicts end as one line and exit 1, never a traceback: a namespace name another lab
has, `down` while `up` runs, `up` while `down` runs. Each race is made deterministic by freezing
one side at a named point (``NETLAB_TEST_SIGNAL_AT=STOP@<point>``, see ``netlab.testhooks``).
Labs are named ``hz*``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netlab import netns as ns
from netlab import state

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]
NETLAB = [sys.executable, "-m", "netlab.cli"]


def netlab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETLAB, *args], capture_output=True, text=True, timeout=120)


def frozen_at(point: str, *args: str) -> subprocess.Popen[str]:
    """`netlab ARGS` that stops itself (SIGSTOP) at ``point``; returns once it has."""
    proc = subprocess.Popen([*NETLAB, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NETLAB_TEST_SIGNAL_AT": f"STOP@{point}"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "T":
            return proc
        assert proc.poll() is None, f"ended before {point}: {proc.communicate()}"
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"never reached {point}")


def resume(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def one_line(r: subprocess.CompletedProcess[str], *want: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in want:
        assert w in r.stderr, r.stderr


def topology(tmp_path: Path, lab: str, node: str, app: bool = False) -> str:
    f = tmp_path / f"{lab}.yaml"
    f.write_text(f"name: {lab}\nnodes: [{{name: {node}}}]\nnamespaces: {{default: {{}}}}\n"
                 f"pods: [{{name: p, namespace: default, node: {node}{', app: httpbin' if app else ''}}}]\n")
    return str(f)


def test_a_namespace_name_another_lab_has_is_one_line(tmp_path: Path) -> None:
    """Lab hz's node c-fabric would be namespace hz-c-fabric: lab hz-c's fabric."""
    assert netlab("up", topology(tmp_path, "hz-c", "node-a"), "--tunnel", "userspace", "-q").returncode == 0
    try:
        r = netlab("up", topology(tmp_path, "hz", "c-fabric"), "--tunnel", "userspace", "-q")
        one_line(r, "'hz-c-fabric' already exists", "lab 'hz-c'")
        assert not state.lab_dir("hz").exists()
        assert json.loads(netlab("status", "hz-c", "--json").stdout)["health"] == "up"
    finally:
        netlab("down", "hz-c")
    assert [n for n in ns.list_netns() if n.startswith("hz")] == []


@pytest.mark.parametrize("point", ["netns:hz-u-node-a", "runtime"])
def test_down_while_up_runs_is_refused_in_one_line(tmp_path: Path, point: str) -> None:
    """`down` while `up` makes namespaces, and while it starts the processes (the lab's kernel
    objects all made, its processes not yet): refused, and the `up` then completes."""
    up = frozen_at(point, "up", topology(tmp_path, "hz-u", "node-a", app=True), "--tunnel", "userspace", "-q")
    try:
        one_line(netlab("down", "hz-u"), "being brought up", str(up.pid))
        rc, err = resume(up)
        assert rc == 0, err
        st = json.loads(netlab("status", "hz-u", "--json").stdout)
        assert st["health"] == "up" and [p["state"] for p in st["processes"]] == ["running"], st
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        netlab("down", "hz-u")
    assert [n for n in ns.list_netns() if n.startswith("hz-u-")] == []


def test_up_while_down_runs_is_refused_in_one_line(tmp_path: Path) -> None:
    topo = topology(tmp_path, "hz-d", "node-a", app=True)
    assert netlab("up", topo, "--tunnel", "userspace", "-q").returncode == 0
    down = frozen_at("down", "down", "hz-d")
    try:
        one_line(netlab("up", topo, "--tunnel", "userspace", "-q"), "'hz-d'", "taken down")
        rc, err = resume(down)
        assert rc == 0, err
        assert not state.lab_dir("hz-d").exists()
        r = netlab("up", topo, "--tunnel", "userspace", "-q")  # and once it is down, up works again
        assert r.returncode == 0, r.stderr
    finally:
        if down.poll() is None:
            down.kill()
            down.wait()
        netlab("down", "hz-d")
    assert [n for n in ns.list_netns() if n.startswith("hz-d-")] == []
