"""Crash cleanup: SIGKILL `netlab up` at 20 seeded random moments, then `netlab down` must leave nothing.

The topology is a small mesh (ambient-to-sidecar: 7 namespaces, 8 supervised processes) so the
kill points cover interpreter start, the kernel apply, the CA/registry bootstrap, the supervisor
launch (the double fork) and the wait for readiness. After each `down` we look for, by name and by
identity: the lab's namespaces, /etc/netns/<lab>-* dirs, its state (ledger) dir, every PID it ever
recorded (supervisor.json, procs.json, ledger "process" lines; PID + starttime), any process whose
command line mentions the lab or its state dir, and any process still living in one of the lab's
network namespaces (by netns inode, so an app that does not name the lab is caught too). Then we
wait a moment and look again: a supervisor launcher that outlived `up` must not come back later.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netlab import netns as ns
from netlab.lab import state_dir
from tests.kernel.conftest import root_snapshot

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]

NETLAB = [sys.executable, "-m", "netlab.cli"]
LAB = "hxcrash"
SEED = 20240818
KILLS = 20


def _read_json(p: Path) -> object:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def recorded_pids(lab: str) -> set[tuple[int, int | None]]:
    """Every (pid, starttime) the lab wrote down anywhere in its state dir."""
    sd = state_dir(lab)
    out: set[tuple[int, int | None]] = set()
    sup = _read_json(sd / "supervisor.json")
    if isinstance(sup, dict) and sup.get("pid"):
        out.add((int(sup["pid"]), sup.get("starttime")))
    procs = _read_json(sd / "procs.json")
    if isinstance(procs, dict):
        out |= {(int(e["pid"]), e.get("starttime")) for e in procs.values() if e.get("pid")}
    try:
        for line in (sd / "ledger.jsonl").read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("op") == "process":
                out.add((int(e["pid"]), e.get("starttime")))
    except OSError:
        pass
    return out


def _starttime(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode("latin-1")
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2:].split()
    return None if f[0] in ("Z", "X") else int(f[19])


def lab_netns_inodes(lab: str) -> dict[int, str]:
    out = {}
    for n in ns.list_netns():
        if n.startswith(f"{lab}-"):
            try:
                out[os.stat(ns.netns_path(n)).st_ino] = n
            except OSError:
                pass
    return out


def lab_processes(lab: str, inodes: dict[int, str]) -> list[str]:
    """Live processes that name the lab / its state dir, or live in one of its namespaces."""
    me = os.getpid()
    sd = str(state_dir(lab))
    hits = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            st = (d / "stat").read_text()
            if st[st.rindex(")") + 2] in "ZX":
                continue
            ino = os.stat(d / "ns" / "net").st_ino
        except (OSError, ValueError):
            continue
        words = cmd.split()
        if lab in words or f"--lab={lab}" in words or sd in cmd or ino in inodes:
            hits.append(f"pid {d.name} ({inodes.get(ino, 'cmdline')}): {cmd[:160]}")
    return hits


def leftovers(lab: str, pids: set[tuple[int, int | None]], inodes: dict[int, str]) -> list[str]:
    left = [f"netns {n}" for n in ns.list_netns() if n.startswith(f"{lab}-")]
    if state_dir(lab).exists():
        left.append(f"state dir {state_dir(lab)}")
    etc = Path("/etc/netns")
    if etc.is_dir():
        left += [f"etc {p}" for p in etc.iterdir() if p.name.startswith(f"{lab}-")]
    left += [f"recorded pid {p} alive" for p, st in pids if _starttime(p) is not None and (st is None or _starttime(p) == st)]
    left += lab_processes(lab, inodes)
    return left


def _kill_points(total: float) -> list[float]:
    """20 seeded delays: 3 inside interpreter start-up, the rest spread over the whole `up` (+10%)."""
    rng = random.Random(SEED)
    early = [rng.uniform(0.0, 0.25) for _ in range(3)]
    rest = [rng.uniform(0.0, total * 1.1) for _ in range(KILLS - len(early))]
    pts = early + rest
    rng.shuffle(pts)
    return pts


def _run_up(lab: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*NETLAB, "up", "ambient-to-sidecar", "--name", lab, "--tunnel", "userspace", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _down(lab: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETLAB, "down", lab], capture_output=True, text=True, timeout=60)


def test_sigkill_up_at_random_points_then_down_leaves_nothing() -> None:
    root_before = root_snapshot()
    assert leftovers(LAB, set(), {}) == [], "a previous run left things behind"

    # calibrate: how long does a full `up` take here?
    t0 = time.monotonic()
    p = _run_up(LAB)
    _, err = p.communicate(timeout=120)
    total = time.monotonic() - t0
    assert p.returncode == 0, err.decode()
    inodes = lab_netns_inodes(LAB)
    pids = recorded_pids(LAB)
    assert len(inodes) == 7 and len(pids) >= 9  # supervisor + 8 processes
    r = _down(LAB)
    assert r.returncode == 0, r.stderr
    assert leftovers(LAB, pids, inodes) == []

    results = []
    for i, delay in enumerate(_kill_points(total)):
        proc = _run_up(LAB)
        inodes, pids = {}, set()
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and proc.poll() is None:
            inodes |= lab_netns_inodes(LAB)  # keep what we saw: the kill may come before we look again
            time.sleep(0.01)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        inodes |= lab_netns_inodes(LAB)
        pids |= recorded_pids(LAB)
        r = _down(LAB)
        what = f"kill #{i} at {delay:.3f}s of {total:.2f}s" + (" (up had finished)" if finished else "")
        if not state_dir(LAB).exists() and r.returncode == 2 and "no lab named" in r.stderr:
            pass  # killed before the ledger existed: nothing to take down
        else:
            assert r.returncode == 0, f"{what}: down failed: {r.stderr}"
        left = leftovers(LAB, pids, inodes)
        assert left == [], f"{what}: left behind after down: {left}"
        results.append((delay, len(inodes), finished))

    # nothing may come back later (a supervisor launcher that outlived `up`)
    time.sleep(1.0)
    assert leftovers(LAB, set(), {}) == []
    # the kills really landed at different stages: before any netns, midway, and after processes
    assert any(n == 0 for _, n, _ in results), results
    assert any(0 < n for _, n, f in results if not f), results
    after = root_snapshot()
    assert after == root_before, "root namespace changed"


def test_down_stops_a_supervisor_that_wrote_no_records_yet() -> None:
    """The narrow window a random kill rarely hits: `up` died after launching the supervisor but
    before the daemon wrote supervisor.json / procs.json. Simulated by removing both records from a
    running lab; `down` must still find the daemon (by its --state-dir) and its children."""
    from netlab.lab import Lab

    lab = "hxcrash-rec"
    Lab.up("ambient-to-sidecar", name=lab, tunnel="userspace")
    sd = state_dir(lab)
    inodes = lab_netns_inodes(lab)
    pids = recorded_pids(lab)
    assert len(pids) >= 9
    for f in ("supervisor.json", "procs.json"):
        (sd / f).unlink()
    Lab.down_lab(lab)
    time.sleep(0.5)
    assert leftovers(lab, pids, inodes) == []
