"""`down` at scale (issue 24): namespaces deleted from several threads while the files go, the
ledger read in part, the supervisor waited for by pidfd and ending without its interpreter's
teardown. Each keeps what `down` promised before: only what the lab provably made is removed,
everything of it is, and the report says which is which. Namespaces are prefixed ``hk-m``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netlab import netns as ns
from netlab.kernel import destroy as destroy_mod
from netlab.kernel import ledger
from netlab.kernel.apply import apply
from netlab.kernel.destroy import destroy
from netlab.runtime import procfs
from netlab.runtime import supervisor as sv
from netlab.state import StateDir
from tests import sample_plans as sample

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]


def lingering(prefix: str) -> list[str]:
    return sorted(n for n in ns.list_netns() if n.startswith(prefix))


def test_many_namespaces_from_threads_spare_the_foreign_ones_and_the_report_keeps_ledger_order() -> None:
    """43 namespaces (more than destroy's threads), two of them replaced by namespaces this lab
    did not make, one already gone, one hosts file replaced by another: destroy removes the
    rest, leaves those (each named once, the foreign namespaces with their own cookies), and
    lists what it deleted in the ledger's reverse order, as the one-thread loop did."""
    plan = sample.build("hk-m", nodes=2, pods_per_node=20, files=True)
    assert len(plan.netns) > destroy_mod._NETNS_THREADS
    apply(plan)
    foreign = ["hk-m-n1-p7", "hk-m-n2-p13"]
    gone = "hk-m-n2-p3"
    hosts = Path("/etc/netns/hk-m-n1-p2/hosts")
    order = [e["obj"]["name"] for e in ledger.read_entries("hk-m") if e.get("type") == "Netns"]
    held = -1
    try:
        cookies = {}
        for name in foreign:
            ns.delete_netns(name)
            ns.create_netns(name)
            cookies[name] = ns.netns_cookie(name)
        ns.delete_netns(gone)
        # the lab's inode stays open while another file takes its name: freed, the file system
        # may give the new file the same inode number, which is the lab's file as far as any
        # (dev, ino) check can tell (CI saw it once)
        held = os.open(hosts, os.O_RDONLY)
        hosts.unlink()
        hosts.write_text("not the lab's\n")
        rep = destroy("hk-m")
        assert not rep.errors, rep.errors
        assert rep.netns_deleted == [n for n in reversed(order) if n not in foreign and n != gone]
        assert sorted(rep.kept) == sorted([f"netns {n} (not the namespace this lab made: another lab or user has "
                                           "that name now)" for n in foreign]
                                          + [f"file {hosts} (not the file this lab made)"]), rep.kept
        assert lingering("hk-m-") == sorted(foreign)
        assert {n: ns.netns_cookie(n) for n in foreign} == cookies
        assert hosts.read_text() == "not the lab's\n"
        assert len(rep.files_removed) == len(plan.files) - 1
        assert [p for p in Path("/etc/netns").glob("hk-m-*") if p != hosts.parent] == []
        assert not StateDir.of("hk-m").path.exists()
    finally:
        if held >= 0:
            os.close(held)
        for name in foreign:
            ns.delete_netns(name)
        hosts.unlink(missing_ok=True)
        if hosts.parent.exists():
            hosts.parent.rmdir()
        destroy("hk-m", force=True)
    assert lingering("hk-m-") == []


def test_unmount_through_the_checked_fd_never_takes_a_namespace_mounted_at_the_name_since() -> None:
    """destroy checks the cookie of the namespace it opened, then unmounts through that fd: if
    the name was given to another namespace in between, that one stays (by name, it went)."""
    ns.create_netns("hk-mu")
    try:
        fd = ns.open_netns("hk-mu")
        assert fd is not None
        try:
            ours = ns.fd_cookie(fd)
            ns.delete_netns("hk-mu")  # meanwhile: the name freed, and taken by another namespace
            ns.create_netns("hk-mu")
            theirs = ns.netns_id("hk-mu")
            assert theirs not in (None, ours)
            ns.unmount_netns_fd(fd, "hk-mu")
            assert ns.netns_id("hk-mu") == theirs
        finally:
            os.close(fd)
        fd = ns.open_netns("hk-mu")
        assert fd is not None
        try:
            ns.unmount_netns_fd(fd, "hk-mu")  # the checked one: unmounted, its file left
            assert ns.netns_id("hk-mu") == ns.NOT_A_NETNS
        finally:
            os.close(fd)
    finally:
        ns.delete_netns("hk-mu")
    assert lingering("hk-mu") == []


def test_a_caller_short_of_fds_still_has_every_namespace_deleted() -> None:
    """destroy holds an fd per namespace it unmounts; a process near its fd limit (24 here, with
    ~20 in use) runs out mid-way: it unmounts those it holds, then goes on, all of them gone."""
    code = ("import json, os, resource\n"
            "from netlab.kernel.apply import apply\n"
            "from netlab.kernel.destroy import destroy\n"
            "from tests import sample_plans as sample\n"
            "plan = sample.build('hk-mf', nodes=2, pods_per_node=20)\n"
            "apply(plan)\n"
            "keep = [os.open('/dev/null', os.O_RDONLY) for _ in range(12)]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (24, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
            "rep = destroy('hk-mf')\n"
            "print(json.dumps({'deleted': len(rep.netns_deleted), 'want': len(plan.netns), 'errors': rep.errors}))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                       text=True, timeout=120)
    try:
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["errors"] == [] and got["deleted"] == got["want"], got
    finally:
        if lingering("hk-mf-"):
            destroy("hk-mf", force=True)
    assert lingering("hk-mf-") == []


def test_the_part_of_the_ledger_destroy_reads_is_what_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """destroy parses only the lines that can be a process, a failed intent, a directory made,
    or a netns's or file's intent: every such line, written compactly or not, and no key-only
    intent."""
    monkeypatch.setenv("NETLAB_RUN_DIR", str(tmp_path))
    d = tmp_path / "hk-mr"
    d.mkdir()
    want = [{"op": "process", "name": "a", "pid": 1, "starttime": 2},
            {"op": "failed", "key": "netns:x"},
            {"op": "mkdir", "path": "/etc/netns/x", "dev": 1, "ino": 2},
            {"op": "intent", "key": "netns:x", "type": "Netns", "obj": {"name": "x"}, "cookie": 5},
            {"op": "intent", "key": "file:/etc/netns/x/hosts", "type": "File", "obj": {"path": "/etc/netns/x/hosts"}}]
    skip = [{"op": "intent", "key": "link:x/eth0", "type": "Link"}, {"op": "done"},
            {"op": "label", "modes": {}}]
    lines = [json.dumps(e, separators=(",", ":")) for e in want[:3]] + [json.dumps(e) for e in want[3:]]
    lines += [json.dumps(e) for e in skip]
    (d / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    assert destroy_mod._read_ledger("hk-mr") == want
    assert len(ledger.read_entries("hk-mr")) == len(want) + len(skip)


def test_stopped_supervisor_wrote_its_last_records(tmp_path: Path) -> None:
    """The daemon ends with os._exit once its children are reaped: its last records (every
    process stopped, its own state, the log's last line) are written before, and
    stop_supervisor, woken by the daemon's exit, returns as soon as it is gone."""
    sd = tmp_path / "sup"
    quick = {"name": "quick", "netns": "", "kind": "app", "argv": [
        "timeit", "-n", "1", "-s", "print('{\"event\":\"ready\"}', flush=True)", "import time; time.sleep(60)"]}
    pid = sv.start_supervisor("hk-ms", [quick], sd, timeout=10)
    child = sv.status(sd)["procs"]["quick"]["pid"]
    t = time.monotonic()
    assert sv.stop_supervisor(sd, timeout=5)
    took = time.monotonic() - t
    assert not procfs.alive(pid) and not procfs.alive(child)
    assert took < 1.5, took  # not the 2 s grace, nor the 5 s timeout
    assert json.loads((sd / "supervisor.json").read_text())["state"] == "stopped"
    assert json.loads((sd / "procs.json").read_text())["quick"]["state"] == "stopped"
    assert json.loads((sd / "supervisor.log").read_text().splitlines()[-1])["event"] == "stopped"


def test_wait_gone_wakes_at_the_exit_and_never_waits_for_a_reused_pid() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    other = subprocess.Popen(["sleep", "30"])
    try:
        st, ost = procfs.starttime(p.pid), procfs.starttime(other.pid)
        assert st is not None and ost is not None
        t = time.monotonic()
        assert procfs.wait_gone([(p.pid, st), (other.pid, ost + 1)], 10) == []  # ost + 1: not that process
        assert 0.2 < time.monotonic() - t < 2.0
        t = time.monotonic()
        assert procfs.wait_gone([(other.pid, ost)], 0.3) == [other.pid]
        assert 0.25 < time.monotonic() - t < 1.5
    finally:
        other.kill()
        other.wait()
        p.wait()
