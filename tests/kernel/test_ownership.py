"""`down` removes only what its lab provably made, and never stops at one object it cannot remove.

Hostile or unlucky sequences, each with a deterministic kill point (``NETLAB_TEST_SIGNAL_AT``, see
``netlab.testhooks``) or a state a killed or failed `up` can leave: a namespace name one lab only
intended and another lab then made; a name the kernel refuses; a state directory that cannot be
read. Namespaces are prefixed ``rt5``/``hz``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from netlab import netns as ns
from netlab import state
from netlab.kernel import ledger
from netlab.kernel.apply import ApplyError, apply
from netlab.plan.types import Netns
from tests import sample_plans as sample

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]
NETLAB = [sys.executable, "-m", "netlab.cli"]


def netlab(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETLAB, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def topology(tmp_path: Path, lab: str, *nodes: str) -> str:
    """A plain lab: the nodes (made in this order), one pod on the last."""
    f = tmp_path / f"{lab}.yaml"
    f.write_text(f"name: {lab}\nnodes: [{', '.join(f'{{name: {n}}}' for n in nodes)}]\n"
                 f"namespaces: {{default: {{}}}}\npods: [{{name: p, namespace: default, node: {nodes[-1]}}}]\n")
    return str(f)


def test_down_spares_a_namespace_another_lab_made_under_a_name_it_only_intended(tmp_path: Path) -> None:
    """`up rt5-x` is SIGKILLed after its ledger names rt5-x-node-b and before that namespace
    exists; lab rt5 (node x-node-b) then makes a namespace of that very name. `down rt5-x` must
    leave it, say so, and still remove everything rt5-x did make."""
    killed = netlab("up", topology(tmp_path, "rt5-x", "node-a", "node-b"), "--tunnel", "userspace", "-q",
                    env={"NETLAB_TEST_SIGNAL_AT": "KILL@netns:rt5-x-node-b"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "rt5-x-node-b" not in ns.list_netns()
    assert any(e.get("type") == "Netns" and e["obj"]["name"] == "rt5-x-node-b" for e in ledger.read_entries("rt5-x"))
    made_before = [n for n in ns.list_netns() if n.startswith("rt5-x-")]
    assert made_before, "killed before rt5-x made anything: the test proves nothing"
    try:
        r = netlab("up", topology(tmp_path, "rt5", "x-node-b"), "--tunnel", "userspace", "-q")
        assert r.returncode == 0, r.stderr
        theirs = ns.netns_cookie("rt5-x-node-b")
        r = netlab("down", "rt5-x")
        assert r.returncode == 0, r.stderr
        assert "rt5-x-node-b" in ns.list_netns(), "down rt5-x deleted lab rt5's namespace"
        assert ns.netns_cookie("rt5-x-node-b") == theirs
        assert "rt5-x-node-b" in r.stdout + r.stderr, "down does not say which namespace it left"
        assert [n for n in ns.list_netns() if n.startswith("rt5-x-") and n != "rt5-x-node-b"] == []
        assert not state.lab_dir("rt5-x").exists()
        st = json.loads(netlab("status", "rt5", "--json").stdout)
        assert st["lab"] == "rt5"
    finally:
        netlab("down", "rt5")
        netlab("down", "rt5-x")
    assert [n for n in ns.list_netns() if n.startswith("rt5-")] == []


# ---- item 8: one object that cannot go never stops the rest, nor breaks other labs ----

def test_a_name_the_kernel_refuses_rolls_back_to_nothing(netlab_run_dir: Path) -> None:
    """A namespace name longer than a file name may be (h17a's checks reject it up front; the
    kernel layer must cope anyway): apply fails naming it, and the rollback -- which used to stop
    at "File name too long" and leave the state directory, so that `down` failed forever -- now
    leaves nothing."""
    base = sample.build("hz-l", nodes=1, pods_per_node=1)
    long = Netns("hz-l-" + "w" * 300, "pod", "bar/w")
    with pytest.raises(ApplyError) as ei:
        apply(dataclasses.replace(base, netns=(*base.netns, long)))
    assert "File name too long" in str(ei.value) and "rollback" not in str(ei.value), str(ei.value)
    assert not state.lab_dir("hz-l").exists()
    assert [n for n in ns.list_netns() if n.startswith("hz-l-")] == []


@pytest.fixture
def lab_a(tmp_path: Path):
    r = netlab("up", topology(tmp_path, "hz-a", "node-a"), "--tunnel", "userspace", "-q")
    assert r.returncode == 0, r.stderr
    yield "hz-a"
    netlab("down", "hz-a")


def test_down_that_cannot_remove_one_file_removes_the_rest_and_other_labs_still_resolve(
        tmp_path: Path, lab_a: str) -> None:
    """Lab hz-b's hosts file sits on a read-only mount: `down hz-b` removes every namespace anyway,
    names the file it could not remove, exits 1 -- and `status`/`exec` without --lab, which pick
    the one lab that is up, still find hz-a. Once the file can go, `down hz-b` finishes."""
    r = netlab("up", topology(tmp_path, "hz-b", "node-a"), "--tunnel", "userspace", "-q")
    assert r.returncode == 0, r.stderr
    etc = "/etc/netns/hz-b-default-p"
    subprocess.run(["mount", "--bind", etc, etc], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", etc], check=True)
        r = netlab("down", "hz-b")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"{etc}/hosts" in r.stderr and "Read-only" in r.stderr, r.stderr
        assert [n for n in ns.list_netns() if n.startswith("hz-b-")] == []
        st = netlab("status", "--json")
        assert st.returncode == 0 and json.loads(st.stdout)["lab"] == lab_a, st.stderr
        ex = netlab("exec", "p", "--", "ip", "-4", "-o", "addr", "show", "eth0")
        assert ex.returncode == 0 and "10.0.1.2/32" in ex.stdout, ex.stderr
    finally:
        subprocess.run(["umount", etc], check=False)
    r = netlab("down", "hz-b")
    assert r.returncode == 0, r.stderr
    assert not state.lab_dir("hz-b").exists() and not Path(etc).exists()


@pytest.mark.parametrize("plan_json", ["{", "[1, 2]", '{"lab": 7}'])
def test_a_garbage_lab_state_does_not_break_other_labs(lab_a: str, plan_json: str) -> None:
    """A state directory whose plan.json is garbage (a torn write, a hand edit): commands without
    --lab pick the lab that is up; naming the broken lab is one line, exit 1; `down` removes it."""
    d = state.lab_dir("hz-g")
    d.mkdir(mode=0o700)
    (d / "plan.json").write_text(plan_json)
    (d / "ledger.jsonl").write_text('{"op": "intent", "type": "Netns"}\n[3]\n"x"\n{"op": "process", "pid": "x"}\n')
    try:
        st = netlab("status", "--json")
        assert st.returncode == 0 and json.loads(st.stdout)["lab"] == lab_a, st.stderr
        bad = netlab("status", "hz-g")
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "hz-g" in bad.stderr, bad.stderr
        r = netlab("down", "hz-g")
        assert r.returncode == 0 and "Traceback" not in r.stderr and not d.exists(), r.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)
