"""Supervisor daemon and logs.

Tests marked ``kernel`` create ``ha-*`` namespaces and need root. The unmarked ones run the
supervisor with ``netns=""`` (no namespace switch) on processes that open no sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab import netns as ns
from netlab.plan.types import Process
from netlab.runtime import logs, procfs, spawn
from netlab.runtime import supervisor as sv
from netlab.runtime.spawn import ProcSpec

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
SLEEPER = ("timeit", "-n", "1", "import time; time.sleep(60)")  # runs, never prints ready


def _netns(name: str) -> Iterator[str]:
    ns.delete_netns(name)
    ns.create_netns(name)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        ns.delete_netns(name)


@pytest.fixture
def netns1() -> Iterator[str]:
    yield from _netns("ha-1")


@pytest.fixture
def netns2() -> Iterator[str]:
    yield from _netns("ha-2")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    sd = tmp_path / "state"
    yield sd
    sv.stop_supervisor(sd)  # whatever a failing test left behind


def curl(netns: str, url: str) -> tuple[int, str]:
    r = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "-m", "5", "-w", "\n%{http_code}", url],
                       capture_output=True, text=True, timeout=10)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def netns_ino(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def fd_links(pid: int) -> dict[int, str]:
    out = {}
    for f in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd listdir itself used is gone already
            out[int(f)] = os.readlink(f"/proc/{pid}/fd/{f}")
    return out


def sig_ignored(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("SigIgn:"))
    return int(line.split()[1], 16)


def wait_for(pred, timeout: float, interval: float = 0.01):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return pred()


# ---- the brief's scenario --------------------------------------------------------------------


@pytest.mark.kernel
@root_only
def test_supervised_httpbin_restarts_and_stops(netns1: str, state_dir: Path) -> None:
    sup = sv.start_supervisor("ha", [Process("httpbin", netns1, "app", ("netlab.apps.httpbin", "--port", "8080"),
                                             ref="ha/httpbin")], state_dir, timeout=10)
    assert procfs.alive(sup)
    e = sv.status(state_dir)["procs"]["httpbin"]
    pid1 = e["pid"]
    assert e["state"] == "running" and e["restarts"] == 0 and e["alive"]
    assert e["starttime"] == procfs.starttime(pid1)
    assert netns_ino(pid1) == os.stat(ns.netns_path(netns1)).st_ino  # really inside ha-1
    code, body = curl(netns1, "http://127.0.0.1:8080/ip")
    assert code == 200 and json.loads(body) == {"origin": "127.0.0.1"}

    os.kill(pid1, signal.SIGKILL)
    t0 = time.monotonic()
    back = wait_for(lambda: (x := sv.status(state_dir)["procs"]["httpbin"])["pid"] != pid1
                    and x["state"] == "running" and x, 1.0)
    took = time.monotonic() - t0
    assert back, f"httpbin not back within 1 s: {sv.status(state_dir)}"
    assert took < 1.0 and back["restarts"] == 1 and back["pid"] != pid1 and back["last_exit"] == "signal SIGKILL"
    assert not procfs.alive(pid1)
    assert curl(netns1, "http://127.0.0.1:8080/status/202")[0] == 202

    pids = [sup, back["pid"]]
    assert sv.stop_supervisor(state_dir) is True
    assert not any(procfs.alive(p) for p in pids)
    st = sv.status(state_dir)
    assert st["supervisor"]["alive"] is False and st["procs"]["httpbin"]["state"] == "stopped"
    assert curl(netns1, "http://127.0.0.1:8080/ip")[0] == 0  # nothing listens any more
    assert sv.stop_supervisor(state_dir) is False  # idempotent


# ---- privileges, fds, namespaces -------------------------------------------------------------


@pytest.mark.kernel
@root_only
def test_uid_drop_and_no_inherited_fds(netns1: str, state_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    fd = os.open(marker, os.O_CREAT | os.O_RDWR)
    os.set_inheritable(fd, True)  # a careless spawner would pass this on
    try:
        sv.start_supervisor("ha", [Process("proxy", netns1, "sidecar", ("netlab.apps.httpbin", "--port", "15006"),
                                           uid=1337, gid=1337)], state_dir, timeout=10)
    finally:
        os.close(fd)
    pid = sv.status(state_dir)["procs"]["proxy"]["pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    line = {ln.split(":")[0]: ln.split(":")[1].split() for ln in status.splitlines()}
    assert line["Uid"] == ["1337"] * 4 and line["Groups"] == []
    # real gid nogroup, effective/saved/fs 1337 (what --gid-owner matches): see netlab.runtime.spawn
    assert line["Gid"] == [str(spawn.DROPPED_REAL_GID), "1337", "1337", "1337"]
    caps = {k: int(line[k][0], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert caps == dict.fromkeys(caps, 0), f"capabilities left: {caps}"
    mine = set(fd_links(os.getpid()).values())
    theirs = fd_links(pid)
    assert str(marker) not in theirs.values()
    assert theirs[1] == theirs[2] == str(sv.log_path(state_dir, "proxy"))
    assert not (set(theirs.values()) & mine) - {"/dev/null"}, f"inherited fds: {theirs}"
    assert not sig_ignored(pid) & (1 << (signal.SIGHUP - 1))  # no ignored signals leak in
    assert curl(netns1, "http://127.0.0.1:15006/ip")[0] == 200


@pytest.mark.kernel
@root_only
def test_supervisor_sigkill_takes_children_with_it(netns1: str, state_dir: Path) -> None:
    sup = sv.start_supervisor("ha", [Process("hb", netns1, "app", ("netlab.apps.httpbin", "--port", "8080")),
                                     Process("px", netns1, "sidecar", ("netlab.apps.sink", "--port", "9000"),
                                             uid=1337, gid=1337)], state_dir, timeout=10)
    procs = sv.status(state_dir)["procs"]
    os.kill(sup, signal.SIGKILL)  # no chance to clean up: PR_SET_PDEATHSIG must do it
    left = procfs.wait_gone([(e["pid"], e["starttime"]) for e in procs.values()], 2.0)
    assert left == []


@pytest.mark.kernel
@root_only
def test_netns_etc_hosts_and_ip_netns_exec_mode(netns2: str, state_dir: Path) -> None:
    etc = Path("/etc/netns") / netns2
    etc.mkdir(parents=True, exist_ok=True)
    hosts = "127.0.0.1 localhost\n10.44.0.9 httpbin.bar.svc.cluster.local\n"
    (etc / "hosts").write_text(hosts)
    try:
        sv.start_supervisor("ha", [
            {"name": "with-etc", "netns": netns2, "kind": "app", "argv": ["netlab.apps.httpbin", "--port", "1"],
             "netns_etc": True},
            {"name": "plain", "netns": netns2, "kind": "app", "argv": ["netlab.apps.httpbin", "--port", "2"]},
            {"name": "via-ip", "netns": netns2, "kind": "app", "argv": ["netlab.apps.helloworld", "--port", "3"],
             "exec_mode": "ip-netns-exec"},
        ], state_dir, timeout=10)
        procs = sv.status(state_dir)["procs"]
        # /proc/PID/root resolves paths in that process's mount namespace
        assert Path(f"/proc/{procs['with-etc']['pid']}/root/etc/hosts").read_text() == hosts
        assert Path(f"/proc/{procs['plain']['pid']}/root/etc/hosts").read_text() == Path("/etc/hosts").read_text()
        assert Path("/etc/hosts").read_text() != hosts  # the host's own file is untouched
        want = os.stat(ns.netns_path(netns2)).st_ino
        assert {netns_ino(e["pid"]) for e in procs.values()} == {want}
        # with ip netns exec, the recorded PID is the app itself (ip execs, it does not fork)
        assert "netlab.apps.helloworld" in Path(f"/proc/{procs['via-ip']['pid']}/cmdline").read_text()
        assert curl(netns2, "http://127.0.0.1:3/hello")[1].startswith("Hello version: v1, instance: via-ip")
    finally:
        sv.stop_supervisor(state_dir)
        (etc / "hosts").unlink()
        etc.rmdir()


@pytest.mark.kernel
@root_only
def test_restart_api(netns1: str, state_dir: Path) -> None:
    sv.start_supervisor("ha", [Process("hello", netns1, "app", ("netlab.apps.helloworld",))], state_dir, timeout=10)
    old = sv.status(state_dir)["procs"]["hello"]["pid"]
    new = sv.restart(state_dir, "hello")
    e = sv.status(state_dir)["procs"]["hello"]
    assert new != old and e["pid"] == new and e["requested_restarts"] == 1 and e["restarts"] == 0
    assert not procfs.alive(old)
    assert curl(netns1, "http://127.0.0.1:5000/hello")[0] == 200
    with pytest.raises(sv.SupervisorError, match="no process 'nope'"):
        sv.restart(state_dir, "nope")


@pytest.mark.kernel
@root_only
def test_start_and_stop_one_process_api(netns1: str, state_dir: Path) -> None:
    """A process added to and removed from a running supervisor (`netlab waypoint`): the others
    keep their PIDs, the added one is supervised (restarted when killed), the stopped one is gone."""
    sv.start_supervisor("ha", [Process("hello", netns1, "app", ("netlab.apps.helloworld",))], state_dir, timeout=10)
    hello = sv.status(state_dir)["procs"]["hello"]["pid"]
    pid = sv.start_process(state_dir, Process("hb", netns1, "app", ("netlab.apps.httpbin", "--port", "8080")))
    assert curl(netns1, "http://127.0.0.1:8080/get")[0] == 200
    assert sv.start_process(state_dir, Process("hb", netns1, "app", ("netlab.apps.httpbin", "--port", "8080"))) == pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: sv.status(state_dir)["procs"]["hb"]["pid"] not in (pid, None)
             and sv.status(state_dir)["procs"]["hb"]["state"] == "running", 10)
    again = sv.status(state_dir)["procs"]["hb"]["pid"]
    sv.stop_process(state_dir, "hb")
    assert "hb" not in sv.status(state_dir)["procs"] and not procfs.alive(again)
    sv.stop_process(state_dir, "hb")  # gone already: nothing to do
    assert sv.status(state_dir)["procs"]["hello"]["pid"] == hello
    assert curl(netns1, "http://127.0.0.1:5000/hello")[0] == 200


@pytest.mark.kernel
@root_only
def test_missing_netns_fails_with_name(state_dir: Path) -> None:
    with pytest.raises(sv.SupervisorError) as ei:
        sv.start_supervisor("ha", [Process("lost", "ha-does-not-exist", "app", ("netlab.apps.httpbin",))],
                            state_dir, timeout=10)
    msg = str(ei.value)
    assert "'lost'" in msg and "ha-does-not-exist" in msg and str(sv.log_path(state_dir, "lost")) in msg
    assert not sv.status(state_dir)["supervisor"]["alive"]


# ---- no root needed --------------------------------------------------------------------------


def test_crash_loop_fails_fast_naming_process(state_dir: Path) -> None:
    t = time.monotonic()
    with pytest.raises(sv.SupervisorError) as ei:
        sv.start_supervisor("ha", [{"name": "broken", "netns": "", "kind": "app", "argv": ["netlab.apps.no_such_app"]}],
                            state_dir, timeout=20)
    msg = str(ei.value)
    assert time.monotonic() - t < 10
    assert "'broken'" in msg and "exited before ready" in msg and "No module named" in msg
    assert str(sv.log_path(state_dir, "broken")) in msg
    st = sv.status(state_dir)
    assert not st["supervisor"]["alive"] and not st["procs"]["broken"]["alive"]


def test_ready_timeout_names_process_and_kills_everything(state_dir: Path) -> None:
    procs = [{"name": "slow", "netns": "", "kind": "app", "argv": list(SLEEPER)},
             {"name": "slow2", "netns": "", "kind": "app", "argv": list(SLEEPER)}]
    with pytest.raises(sv.SupervisorError, match=r"process 'slow' not ready after 1\.5s.*also not ready: slow2"):
        sv.start_supervisor("ha", procs, state_dir, timeout=1.5)
    st = sv.status(state_dir)
    assert not st["supervisor"]["alive"]
    assert all(not e["alive"] and e["pid"] for e in st["procs"].values())


def test_second_supervisor_refused(state_dir: Path) -> None:
    ready = {"name": "r", "netns": "", "kind": "app",
             "argv": ["timeit", "-n", "1", "print('{\"event\":\"ready\"}', flush=True); import time; time.sleep(60)"]}
    pid = sv.start_supervisor("ha", [ready], state_dir, timeout=10)
    with pytest.raises(sv.SupervisorError, match=f"pid {pid}"):
        sv.start_supervisor("ha", [ready], state_dir, timeout=10)
    assert procfs.alive(pid)
    assert sv.status(state_dir)["procs"]["r"]["state"] == "running"


def test_stop_kills_a_child_that_ignores_sigterm(state_dir: Path) -> None:
    stubborn = {"name": "stubborn", "netns": "", "kind": "app", "argv": [
        "timeit", "-n", "1", "-s", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('{\"event\":\"ready\"}', flush=True)", "time.sleep(60)"]}
    sup = sv.start_supervisor("ha", [stubborn], state_dir, timeout=10)
    e = sv.status(state_dir)["procs"]["stubborn"]
    assert sig_ignored(e["pid"]) & (1 << (signal.SIGTERM - 1))  # really ignores SIGTERM
    t = time.monotonic()
    assert sv.stop_supervisor(state_dir, timeout=5)
    took = time.monotonic() - t
    assert 1.9 < took < 4.0, took  # waited the 2 s grace, then SIGKILL
    assert not procfs.alive(sup) and not procfs.alive(e["pid"])
    assert sv.status(state_dir)["procs"]["stubborn"]["last_exit"] == "signal SIGKILL"
    assert '"event":"kill","name":"stubborn"' in (state_dir / "supervisor.log").read_text()


def test_spec_validation() -> None:
    ok = ProcSpec.from_any(Process("a", "ha-x", "app", ("netlab.apps.sink",), uid=1337, gid=1337))
    assert ok.command()[1:] == ["-m", "netlab.apps.sink"]
    assert ProcSpec.from_any({**ok.to_dict(), "env": {"A": "1"}}).env == (("A", "1"),)
    for bad, why in [({"argv": []}, "empty argv"), ({"exec_mode": "ip-netns-exec"}, "runs as root"),
                     ({"caps": ["CAP_FOO"]}, "unknown capability"), ({"name": "x/y"}, "bad process name"),
                     ({"bogus": 1}, "unknown keys")]:
        with pytest.raises(ValueError, match=why):
            ProcSpec.from_any({**ok.to_dict(), **bad})


def test_is_ready_line() -> None:
    assert sv.is_ready_line(b'{"event":"ready"}')
    assert sv.is_ready_line(b'  {"event": "ready", "ports": [1]}\r')
    assert not sv.is_ready_line(b'{"event":"readyish"}')
    assert not sv.is_ready_line(b"ready")
    assert not sv.is_ready_line(b'{"msg":"ready"}')


def test_procfs_identity() -> None:
    st = procfs.starttime(os.getpid())
    assert st and procfs.alive(os.getpid(), st)
    assert not procfs.alive(os.getpid(), st + 1)  # same PID, other start time: not ours
    p = subprocess.Popen(["sleep", "30"])
    s = procfs.starttime(p.pid)
    assert procfs.terminate([(p.pid, s)], grace=1.0, group=False) == []
    p.wait()
    assert not procfs.alive(p.pid, s)


def test_logs_tail(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    f = tmp_path / "logs" / "hb.log"
    f.write_text("".join(f"line {i}\n" for i in range(5000)))
    assert list(logs.tail(tmp_path, "hb", 3)) == ["line 4997", "line 4998", "line 4999"]
    assert logs.last_lines(f, 1, block=7) == ["line 4999"]
    assert logs.components(tmp_path) == ["hb"]
    with pytest.raises(FileNotFoundError, match="components: hb"):
        list(logs.tail(tmp_path, "nope", 3))

    seen: list[str] = []
    gen = logs.tail(tmp_path, "hb", 1, follow=True, poll=0.01, stop=lambda: len(seen) >= 4)
    seen.append(next(gen))
    with open(f, "a") as w:
        w.write("new 1\nnew ")
        w.flush()
        seen.append(next(gen))
        w.write("2\n")
    seen.append(next(gen))
    f.write_text("after truncate\n")
    seen.append(next(gen))
    assert seen == ["line 4999", "new 1", "new 2", "after truncate"]
    assert list(gen) == []  # stop() ended the follow

    f.write_text("a\nhalf")  # a line still being written is completed, not split in two
    assert list(logs.tail(tmp_path, "hb", 1)) == ["half"]
    got: list[str] = []
    gen = logs.tail(tmp_path, "hb", 1, follow=True, poll=0.01, stop=lambda: len(got) >= 2)
    got.append(next(gen))
    with open(f, "a") as w:
        w.write(" done\n")
    got.append(next(gen))
    assert got == ["a", "half done"]
