"""Processes started by forking the pre-imported supervisor (netlab.runtime.forkspawn).

A root ``python -m`` program is forked, not exec'd: it must look and behave as an exec'd one
(its netns, its command line, its own log on fds 1 and 2, none of the supervisor's fds or
ignored signals, restarted when killed); a process dropped to another uid is still exec'd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab import netns as ns
from netlab.plan.types import Process
from netlab.runtime import forkspawn, procfs
from netlab.runtime import supervisor as sv
from netlab.runtime.spawn import ProcSpec
from tests.kernel.test_runtime import _netns, curl, fd_links, netns_ino, sig_ignored, wait_for
from tests.kernel.test_runtime import state_dir as state_dir  # the fixture (a supervisor's state dir, stopped after)

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture
def netns1() -> Iterator[str]:
    yield from _netns("hf-1")


def spawns(sd: Path) -> dict[str, str]:
    """name -> how (fork | exec) of each spawn the supervisor logged (the last one wins)."""
    out = {}
    for line in (sd / "supervisor.log").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "spawn":
            out[rec["name"]] = rec.get("how", "?")
    return out


def test_root_program_is_forked_and_behaves_as_exec(netns1: str, state_dir: Path) -> None:
    procs = [Process("web", netns1, "app", ("netlab.apps.httpbin", "--port", "8080"), ref="hf/web"),
             Process("dropped", netns1, "app", ("netlab.apps.httpbin", "--port", "8081"), uid=1337, gid=1337)]
    sup = sv.start_supervisor("hf", procs, state_dir, timeout=20)
    assert spawns(state_dir) == {"web": "fork", "dropped": "exec"}
    pid = sv.status(state_dir)["procs"]["web"]["pid"]
    assert netns_ino(pid) == os.stat(ns.netns_path(netns1)).st_ino
    argv = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    assert argv[1:3] == [b"-m", b"netlab.apps.httpbin"] and b"netlab.runtime.supervisor" not in argv
    theirs = fd_links(pid)
    assert theirs[0] == "/dev/null" and theirs[1] == theirs[2] == str(sv.log_path(state_dir, "web"))
    files = {v for v in theirs.values() if v.startswith("/")}  # none of the supervisor's (lock, its log)
    assert files <= {"/dev/null", str(sv.log_path(state_dir, "web"))}, f"inherited: {theirs}"
    sup_pipes = {v for v in fd_links(sup).values() if v.startswith(("pipe:", "anon_inode:"))} - {"anon_inode:[eventpoll]"}
    assert not sup_pipes & set(theirs.values()), f"the supervisor's pipes inherited: {theirs}"
    assert not sig_ignored(pid) & ((1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGTERM - 1)))
    assert curl(netns1, "http://127.0.0.1:8080/ip")[0] == 200
    assert '"event":"ready"' in sv.log_path(state_dir, "web").read_text()

    os.kill(pid, signal.SIGKILL)  # supervision: a forked child is restarted as an exec'd one is
    back = wait_for(lambda: (x := sv.status(state_dir)["procs"]["web"])["pid"] != pid and x["state"] == "running"
                    and x, 3.0)
    assert back and back["last_exit"] == "signal SIGKILL" and back["restarts"] == 1
    assert curl(netns1, "http://127.0.0.1:8080/status/202")[0] == 202
    assert sv.stop_supervisor(state_dir) is True
    assert not procfs.alive(back["pid"]) and not procfs.alive(sup)


def test_fork_spawn_can_be_turned_off(netns1: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(forkspawn.ENV, "0")  # the supervisor inherits `up`'s environment
    sv.start_supervisor("hf", [Process("web", netns1, "app", ("netlab.apps.httpbin", "--port", "8080"))],
                        state_dir, timeout=20)
    assert spawns(state_dir) == {"web": "exec"}
    assert curl(netns1, "http://127.0.0.1:8080/ip")[0] == 200


def test_eligible_only_root_module_programs() -> None:
    base = {"name": "x", "netns": "n", "kind": "app", "argv": ["netlab.apps.httpbin"]}
    assert forkspawn.eligible(ProcSpec.from_any(base))
    for extra in ({"uid": 1337, "gid": 1337}, {"run": "exec", "argv": ["/bin/true"]}, {"netns_etc": True},
                  {"exec_mode": "ip-netns-exec"}, {"hide": ["/run"]}):
        assert not forkspawn.eligible(ProcSpec.from_any({**base, **extra})), extra


def test_forked_child_runs_the_preloaded_main_without_running_the_module_again(
        netns1: str, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child calls the imported module's ``main()``: the module's top level ran once, in the
    supervisor (runpy ran it again in every child: 4.5 ms of a Geneve relay's 8 ms)."""
    trail = tmp_path / "trail"
    (tmp_path / "hf_probe_prog.py").write_text(
        "import json, os, signal, sys\n"
        f"with open({str(trail)!r}, 'a') as f:\n    f.write(f'import {{os.getpid()}}\\n')\n\n\n"
        "def main() -> int:\n"
        f"    with open({str(trail)!r}, 'a') as f:\n        f.write(f'main {{os.getpid()}} {{sys.argv[1:]}}\\n')\n"
        "    print(json.dumps({'event': 'ready'}), flush=True)\n"
        "    signal.pause()\n    return 0\n\n\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    sup = sv.start_supervisor("hf", [Process("probe", netns1, "app", ("hf_probe_prog", "--x", "1"))], state_dir,
                              timeout=20)
    assert spawns(state_dir) == {"probe": "fork"}
    child = sv.status(state_dir)["procs"]["probe"]["pid"]
    assert trail.read_text().splitlines() == [f"import {sup}", f"main {child} ['--x', '1']"]
    assert netns_ino(child) == os.stat(ns.netns_path(netns1)).st_ino


def test_early_supervisor_exits_when_up_dies_before_telling_it_to_go(tmp_path: Path) -> None:
    """`up` starts the supervisor before its kernel apply (EarlySupervisor); killed before it
    says go, the supervisor sees EOF and exits having made nothing: no state dir, no daemon."""
    sd = tmp_path / "hf-early"
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom netlab.runtime.supervisor import EarlySupervisor\n"
         f"e = EarlySupervisor('hf-early', {str(sd)!r}, ['netlab.apps.httpbin'])\n"
         "print(e.proc.pid, flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    early = int(launcher.stdout.readline())
    assert procfs.alive(early)
    launcher.kill()
    launcher.wait()
    assert wait_for(lambda: not procfs.alive(early), 5.0), "the early supervisor outlived the `up` that started it"
    assert not sd.exists()


def test_supervisor_runs_the_netlab_its_caller_imported(netns1: str, state_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Started from `/` with the caller's environment, the daemon would import whatever netlab the
    interpreter finds (an installed one, not the checkout `up` runs from): it gets the caller's
    netlab directory first on PYTHONPATH, as its children do."""
    import netlab

    monkeypatch.delenv("PYTHONPATH", raising=False)
    sup = sv.start_supervisor("hf", [Process("web", netns1, "app", ("netlab.apps.httpbin", "--port", "8080"))],
                              state_dir, timeout=20)
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{sup}/environ").read_bytes().split(b"\0") if b"=" in kv)
    assert env[b"PYTHONPATH"].split(b":")[0].decode() == str(Path(netlab.__file__).resolve().parents[1])


def test_an_early_supervisor_stopped_before_go_is_a_named_failure(tmp_path: Path) -> None:
    """`down`'s sweep (or anyone) stopped the early supervisor while `up` still applied: the go
    finds it gone and `up` fails saying so, not with an empty reason or an IndexError."""
    early = sv.EarlySupervisor("hf-dead", tmp_path / "sd", [])
    assert early.proc is not None
    early.proc.send_signal(signal.SIGTERM)
    early.proc.wait()
    with pytest.raises(sv.SupervisorError, match=r"the early supervisor exited \(status -15\) before it was told"):
        sv.start_supervisor("hf-dead", [], tmp_path / "sd", early=early)
