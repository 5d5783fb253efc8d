"""Per-lab supervisor daemon, and the client calls `netlab up/down/restart/status` use.

`netlab up` is a short-lived command, yet a lab's ztunnels, sidecars and apps must keep running
(and come back when they die) until `netlab down`. So `up` launches one daemon per lab:

    python -m netlab.runtime.supervisor --lab LAB --spec SPEC.json --state-dir DIR [--foreground]

which double-forks away from the caller, spawns every process of SPEC.json in its netns
(``netlab.runtime.spawn``; root ``python -m`` programs are forked from the daemon, which has
imported their modules once: ``netlab.runtime.forkspawn``), and restarts them when they exit (first restart immediate, then
exponential backoff: the loop is :mod:`netlab.runtime.daemon`). Everything a client needs is in files under DIR (the lab's state
directory; :mod:`netlab.state` names them), written atomically: the daemon's record {pid,
starttime, lab, state} and its own log; the processes' records (name -> {pid, starttime,
restarts, state, ...}); each process's stdout+stderr (appended across restarts); restart
requests and start/stop requests of one process, picked up on SIGUSR1.

Readiness is the first line of the log, after the spawn, that is JSON with ``"event":
"ready"`` (:func:`is_ready_line`); a pod's own program (``run="exec"``) is probed from outside
instead (``netlab.runtime.probe``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from netlab.runtime import forkspawn, procfs
from netlab.runtime.daemon import STOP_GRACE, Supervisor, load_specs
from netlab.runtime.logs import last_lines as _log_tail
from netlab.runtime.probe import is_ready_line
from netlab.runtime.spawn import ProcSpec
from netlab.state import StateDir, read_record, write_record

__all__ = ["EarlySupervisor", "SupervisorError", "is_ready_line", "last_lines", "log_path", "main", "restart", "start_supervisor",
           "start_process", "status", "stop_process", "stop_supervisor", "wait_ready"]


class SupervisorError(RuntimeError):
    """Start/stop failed; the message names the process and where its log is."""


def log_path(state_dir: str | Path, name: str) -> Path:
    return StateDir(Path(state_dir)).log(name)


def last_lines(path: Path, n: int = 15) -> str:
    return "\n".join(_log_tail(path, n))


_now = time.monotonic


# ---------------------------------------------------------------------------------------------
# daemon entry point


def _daemonize(state_dir: Path) -> int | None:
    """Double fork. Returns None in the daemon; in the original process, the daemon's PID.

    The daemon reports its PID (or why it could not start) through a pipe, so the launcher knows
    the daemon is really up, holds the state-dir lock, and has written supervisor.json.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode()
        os.waitpid(pid, 0)
        if msg.startswith("OK "):
            return int(msg[3:])
        raise SupervisorError(msg.removeprefix("ERR ").strip() or "supervisor died while starting")
    os.close(r)
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir("/")
        os.umask(0o022)
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = os.open(StateDir(state_dir).supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(devnull)
        os.close(out)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        _take_lock(state_dir)
        _write_pidfile(state_dir)
    except BaseException as e:  # noqa: BLE001 - report anything to the launcher
        os.write(w, f"ERR {e}".encode())
        os._exit(1)
    os.write(w, f"OK {os.getpid()}".encode())
    os.close(w)
    return None


_lock_fd: int | None = None


def _take_lock(state_dir: Path) -> None:
    """One supervisor per state dir: the flock lives as long as the daemon (fd is CLOEXEC)."""
    global _lock_fd
    files = StateDir(state_dir)
    fd = os.open(files.supervisor_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        info = read_record(files.supervisor) or {}
        raise SupervisorError(f"a supervisor (pid {info.get('pid')}) already runs for {state_dir}") from None
    _lock_fd = fd


def _write_pidfile(state_dir: Path, lab: str | None = None) -> None:
    pid = os.getpid()
    write_record(StateDir(state_dir).supervisor,
                {"pid": pid, "starttime": procfs.starttime(pid), "lab": lab or _lab, "state": "running"})


_lab = ""


def main(argv: list[str] | None = None) -> int:
    global _lab
    p = argparse.ArgumentParser(prog="netlab.runtime.supervisor", description=__doc__.splitlines()[0])
    p.add_argument("--lab", required=True)
    p.add_argument("--spec", required=True, help="JSON list of netlab.plan.types.Process dicts")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--foreground", action="store_true", help="don't daemonize (debugging)")
    p.add_argument("--preload", default="", metavar="MOD,...",
                   help="import these program modules, then wait for 'go' on stdin before reading --spec "
                        "(started early by `up`: see EarlySupervisor); EOF instead of 'go' exits quietly")
    a = p.parse_args(argv)
    _lab = a.lab
    if a.preload and not _preload_until_go(a.preload.split(",")):
        return 0  # `up` failed or was killed before its kernel objects were made: nothing to do
    state_dir = Path(a.state_dir).resolve()
    try:
        specs = load_specs(a.spec)  # fail here, in the caller's terminal, not in a daemon log
    except (OSError, ValueError) as e:
        print(f"netlab supervisor: bad spec: {e}", file=sys.stderr)
        return 2
    if not state_dir.is_dir():
        # `netlab down` removed the lab while this daemon was starting: never resurrect its state dir
        print(f"netlab supervisor: state dir {state_dir} is gone; not starting", file=sys.stderr)
        return 1
    if a.foreground:
        try:
            _take_lock(state_dir)
        except SupervisorError as e:
            print(f"netlab supervisor: {e}", file=sys.stderr)
            return 1
        _write_pidfile(state_dir)
    else:
        try:
            pid = _daemonize(state_dir)
        except SupervisorError as e:
            print(f"netlab supervisor: {e}", file=sys.stderr)
            return 1
        if pid is not None:
            print(pid, flush=True)
            return 0
    sup = Supervisor(a.lab, specs, state_dir)
    sup.say("start", lab=a.lab, pid=os.getpid(), procs=[s.name for s in specs])
    try:
        rc = sup.run()
    finally:
        info = read_record(sup.files.supervisor) or {}
        if info.get("pid") == os.getpid():
            info["state"] = "stopped"
            write_record(sup.files.supervisor, info)
    if a.foreground:
        return rc
    # The daemon's children are reaped and its records written: what is left is the
    # interpreter's teardown of every module it imported for its forked children (50-80 ms of a
    # 1,000-pod lab's `down`, which waits for this process to be gone). atexit still runs.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _preload_until_go(modules: list[str]) -> bool:
    """The early supervisor's wait: import the program modules one at a time while `up` applies
    the kernel objects, and stop importing as soon as ``go`` is there (a small lab's apply ends
    before the imports do: its exec'd processes, sidecars, must not wait for them; the daemon
    imports the rest after starting those). True on ``go``; False on EOF (`up` gave up or died)."""
    for mod in modules:
        if select.select([0], [], [], 0)[0]:
            break
        forkspawn.preload_modules([mod])  # (a failure shows again, in the child's log)
    return sys.stdin.buffer.readline().strip() == b"go"


# ---------------------------------------------------------------------------------------------
# client API


def _spec_dicts(processes: Iterable[Any]) -> list[dict[str, Any]]:
    specs = [ProcSpec.from_any(p) for p in processes]
    return [s.to_dict() for s in specs]


def _command(lab: str, spec_path: Path, sd: Path) -> list[str]:
    return [sys.executable, "-m", "netlab.runtime.supervisor", "--lab", lab, "--spec", str(spec_path),
            "--state-dir", str(sd)]


def _env() -> dict[str, str]:
    """The caller's environment, with the directory this netlab is imported from first on
    PYTHONPATH (as ``spawn.child_env`` gives the children): started from a source tree, the
    supervisor and every program it forks run that tree, not whatever netlab the interpreter
    would find from ``/``."""
    import netlab

    root = str(Path(list(netlab.__path__)[0]).parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class EarlySupervisor:
    """A supervisor started while `up` still makes the lab's kernel objects.

    Why: its cold interpreter and the import of every program module it forks (forkspawn) cost
    0.3-0.5 s of one CPU, which `up` otherwise spends after the kernel apply, on the critical
    path; started first, it does that on the other CPU while the apply waits on the kernel.
    It waits on a pipe for ``go`` (sent by :func:`start_supervisor`) before it reads its spec,
    touches the state directory or daemonizes: until then it is an ordinary child of `up`, so a
    failed `up` (:meth:`cancel`) or a killed one (the pipe's end, EOF) leaves nothing behind.
    """

    def __init__(self, lab: str, state_dir: str | Path, modules: Iterable[str]) -> None:
        self.lab, self.state_dir = lab, Path(state_dir).resolve()
        mods = sorted(set(modules))
        cmd = [*_command(lab, StateDir(self.state_dir).spec, self.state_dir), "--preload", ",".join(mods) or "-"]
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", close_fds=True,
            env=_env())

    def go(self, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Let it read its spec and daemonize; what it printed, as ``subprocess.run`` returns it."""
        proc, self.proc = self.proc, None
        if proc is None:
            raise SupervisorError(f"lab {self.lab!r}: the early supervisor was already used")
        out, err = proc.communicate(b"go\n", timeout=timeout)  # (a closed pipe is ignored: it died first)
        rc = proc.returncode
        if not out.strip():  # no PID printed: it died (or `down` stopped it) while it waited
            rc = rc or 1
            err = err or f"the early supervisor exited (status {proc.returncode}) before it was told to start".encode()
        return subprocess.CompletedProcess(proc.args, rc, out.decode(errors="replace"), err.decode(errors="replace"))

    def cancel(self) -> None:
        """EOF instead of ``go``: it exits without having touched anything."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.communicate(timeout=5.0)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def start_supervisor(lab: str, processes: Iterable[Any], state_dir: str | Path, timeout: float = 30.0,
                     early: EarlySupervisor | None = None) -> int:
    """Launch the lab's supervisor daemon; return its PID once every process is ready.

    ``processes``: plan ``Process`` values, ``ProcSpec``s or dicts (dicts may carry the extra
    ProcSpec keys: exec_mode, netns_etc, env, caps, ready_timeout). ``early``: the one `up`
    started before the kernel apply (told to go on here, instead of starting a new one). On
    failure the supervisor is stopped (nothing is left running) and SupervisorError names the
    process, its log and its last log lines.
    """
    sd = Path(state_dir).resolve()
    sd.mkdir(parents=True, exist_ok=True)
    files = StateDir(sd)
    info = read_record(files.supervisor)
    if info and procfs.alive(info.get("pid"), info.get("starttime")):
        raise SupervisorError(f"lab {lab!r}: a supervisor (pid {info['pid']}) already runs for {sd}")
    specs = _spec_dicts(processes)
    spec_path = files.spec
    write_record(spec_path, specs)
    with contextlib.suppress(FileNotFoundError):
        files.procs.unlink()
    if early is not None and early.state_dir == sd and early.lab == lab:
        r = early.go()
    else:
        if early is not None:
            early.cancel()
        r = subprocess.run(_command(lab, spec_path, sd), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           cwd="/", close_fds=True, timeout=30, env=_env())
    if r.returncode != 0:
        raise SupervisorError(f"lab {lab!r}: supervisor did not start: {r.stderr.strip() or r.stdout.strip()}")
    pid = int(r.stdout.split()[0])
    try:
        wait_ready(sd, [s["name"] for s in specs], timeout, sup_pid=pid)
    except BaseException:
        stop_supervisor(sd)
        raise
    return pid


def wait_ready(state_dir: str | Path, names: list[str], timeout: float, sup_pid: int | None = None,
               poll: float = 0.02) -> dict[str, Any]:
    """Wait until every named process is ``running``; fail fast on crash loops."""
    sd = Path(state_dir)
    files = StateDir(sd)
    deadline = _now() + timeout
    procs: dict[str, Any] = {}
    while True:
        procs = read_record(files.procs) or {}
        if procs and all(procs.get(n, {}).get("state") == "running" for n in names):
            return procs
        if sup_pid and not procfs.alive(sup_pid):
            raise SupervisorError(f"supervisor (pid {sup_pid}) died; see {files.supervisor_log}:\n"
                                  f"{last_lines(files.supervisor_log)}")
        for n in names:
            e = procs.get(n)
            # Two exits before ever getting ready is a crash loop, not slowness.
            if e and not e.get("ever_ready") and e.get("restarts", 0) >= 2:
                raise SupervisorError(_failure(sd, n, e, f"exited before ready ({e.get('last_exit')}, "
                                                         f"{e.get('restarts')} restarts)"))
        if _now() >= deadline:
            bad = [n for n in names if procs.get(n, {}).get("state") != "running"] or names
            e = procs.get(bad[0], {})
            why = f"not ready after {timeout:g}s (state {e.get('state')})"
            if bad[1:]:
                why += f"; also not ready: {', '.join(bad[1:])}"
            raise SupervisorError(_failure(sd, bad[0], e, why))
        time.sleep(poll)


def _failure(sd: Path, name: str, entry: dict[str, Any], why: str) -> str:
    lp = log_path(sd, name)
    extra = f"; {entry['last_error']}" if entry.get("last_error") else ""
    return f"process {name!r} {why}{extra}; log {lp}, last lines:\n{last_lines(lp)}"


def stop_supervisor(state_dir: str | Path, timeout: float = 5.0) -> bool:
    """SIGTERM the daemon and wait; then make sure none of its processes survive.

    Returns True if a supervisor was running. Safe to call twice or after a crash.
    """
    files = StateDir(Path(state_dir))
    info = read_record(files.supervisor) or {}
    pid, st = info.get("pid"), info.get("starttime")
    was_running = procfs.alive(pid, st)
    if was_running and pid:
        procfs.kill_checked(pid, st, signal.SIGTERM)
        if procfs.wait_gone([(pid, st)], timeout):
            procfs.kill_checked(pid, st, signal.SIGKILL)
            procfs.wait_gone([(pid, st)], 1.0)
    procs = read_record(files.procs) or {}
    leftovers = [(e["pid"], e.get("starttime")) for e in procs.values() if procfs.alive(e.get("pid"), e.get("starttime"))]
    if leftovers:
        procfs.terminate(leftovers, grace=STOP_GRACE, group=True)
    return was_running


def restart(state_dir: str | Path, name: str, timeout: float = 10.0) -> int:
    """Ask the supervisor to restart one process; returns its new PID once it is ready again."""
    sd = Path(state_dir)
    files = StateDir(sd)
    info = read_record(files.supervisor) or {}
    if not procfs.alive(info.get("pid"), info.get("starttime")):
        raise SupervisorError(f"no supervisor running for {sd}")
    procs = read_record(files.procs) or {}
    if name not in procs:
        raise SupervisorError(f"no process {name!r} (have: {', '.join(sorted(procs))})")
    old_pid, old_req = procs[name].get("pid"), procs[name].get("requested_restarts", 0)
    files.request(name).write_text(f"{time.time()}\n")
    os.kill(info["pid"], signal.SIGUSR1)
    deadline, e = _now() + timeout, procs[name]
    while _now() < deadline:
        e = (read_record(files.procs) or {}).get(name, {})
        if e.get("state") == "running" and e.get("pid") != old_pid and e.get("requested_restarts", 0) > old_req:
            return int(e["pid"])
        time.sleep(0.02)
    raise SupervisorError(_failure(sd, name, e, f"not ready {timeout:g}s after restart"))


def _request(state_dir: str | Path, name: str, op: dict[str, Any]) -> StateDir:
    sd = Path(state_dir)
    files = StateDir(sd)
    info = read_record(files.supervisor) or {}
    if not procfs.alive(info.get("pid"), info.get("starttime")):
        raise SupervisorError(f"no supervisor running for {sd}")
    tmp = files.path / f".request-{name}.tmp"  # beside requests/, not in it: the daemon never reads half a request
    tmp.write_text(json.dumps(op))
    tmp.rename(files.request(name))
    os.kill(info["pid"], signal.SIGUSR1)
    return files


def start_process(state_dir: str | Path, process: Any, timeout: float = 30.0) -> int:
    """Ask the supervisor to start and supervise one more process (a plan ``Process``); its PID
    once it is ready. A process of that name that already runs is left as it is (a re-run)."""
    spec = _spec_dicts([process])[0]
    procs = read_record(StateDir(Path(state_dir)).procs) or {}
    if spec["name"] not in procs:
        _request(state_dir, spec["name"], {"op": "start", "spec": spec})
    wait_ready(state_dir, [spec["name"]], timeout)
    return int((read_record(StateDir(Path(state_dir)).procs) or {})[spec["name"]]["pid"])


def stop_process(state_dir: str | Path, name: str, timeout: float = 10.0) -> None:
    """Ask the supervisor to stop one process for good; returns once it is gone from its records
    (a process it does not have: nothing to do)."""
    files = StateDir(Path(state_dir))
    if name not in (read_record(files.procs) or {}):
        return
    _request(state_dir, name, {"op": "stop"})
    deadline = _now() + timeout
    while _now() < deadline:
        if name not in (read_record(files.procs) or {}):
            return
        time.sleep(0.02)
    raise SupervisorError(f"process {name!r}: still supervised {timeout:g}s after the stop request")


def status(state_dir: str | Path) -> dict[str, Any]:
    """Supervisor and process records, with ``alive`` checked against /proc (PID + starttime)."""
    sd = Path(state_dir)
    files = StateDir(sd)
    info = read_record(files.supervisor) or {}
    sup_alive = procfs.alive(info.get("pid"), info.get("starttime"))
    procs = read_record(files.procs) or {}
    for e in procs.values():
        e["alive"] = procfs.alive(e.get("pid"), e.get("starttime"))
    return {"lab": info.get("lab"), "state_dir": str(sd),
            "supervisor": {"pid": info.get("pid"), "alive": sup_alive,
                           "state": info.get("state") if sup_alive else "stopped"},
            "procs": procs}


if __name__ == "__main__":
    sys.exit(main())
