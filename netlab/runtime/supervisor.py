"""Per-lab supervisor daemon, and the client calls `netlab up/down/restart/status` use.

`netlab up` is a short-lived command, yet a lab's ztunnels, sidecars and apps must keep running
(and come back when they die) until `netlab down`. So `up` launches one daemon per lab:

    python -m netlab.runtime.supervisor --lab LAB --spec SPEC.json --state-dir DIR [--foreground]

which double-forks away from the caller, spawns every process of SPEC.json in its netns
(``netlab.runtime.spawn``), and restarts them when they exit (first restart immediate, then
exponential backoff). Everything a client needs is in files under DIR (the lab's state
directory; :mod:`netlab.state` names them), written atomically: the daemon's record {pid,
starttime, lab, state} and its own log; the processes' records (name -> {pid, starttime,
restarts, state, ...}); each process's stdout+stderr (appended across restarts); restart
requests, picked up on SIGUSR1.

The daemon is single-threaded on purpose: ``preexec_fn`` (setns, mounts, privilege drop) is
only safe to run after fork in a process without other threads. Readiness is the first line
of the log, after the spawn, that is JSON with ``"event": "ready"``; a pod's own program
(``run="exec"``) is probed from outside instead (``netlab.runtime.probe``).
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab.runtime import procfs
from netlab.runtime.logs import last_lines as _log_tail
from netlab.runtime.probe import ReadyCheck, is_ready_line
from netlab.runtime.spawn import ProcSpec, spawn
from netlab.state import StateDir

BACKOFF = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)  # delay before the Nth consecutive restart
STREAK_RESET = 10.0  # a process that stayed ready this long starts a fresh backoff streak
STOP_GRACE = 2.0
READY_POLL = 0.01


class SupervisorError(RuntimeError):
    """Start/stop failed; the message names the process and where its log is."""


# ---------------------------------------------------------------------------------------------
# files shared by daemon and clients


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def log_path(state_dir: str | Path, name: str) -> Path:
    return StateDir(Path(state_dir)).log(name)


def last_lines(path: Path, n: int = 15) -> str:
    return "\n".join(_log_tail(path, n))


_now = time.monotonic


# ---------------------------------------------------------------------------------------------
# the daemon


@dataclass
class Child:
    spec: ProcSpec
    caps: tuple[str, ...]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    starttime: int | None = None
    state: str = "starting"  # starting | running | backoff | restarting | stopped
    restarts: int = 0  # respawns after an unrequested exit
    requested_restarts: int = 0
    streak: int = 0
    spawned_at: float = 0.0
    ready_at: float | None = None
    next_start: float = 0.0
    kill_at: float | None = None
    want_restart: bool = False
    ever_ready: bool = False
    last_exit: str | None = None
    last_error: str | None = None
    scan_offset: int = 0
    partial: bytes = b""
    since: float = field(default_factory=time.time)
    check: ReadyCheck | None = None  # run="exec": the readiness probe of the current spawn

    def record(self) -> dict[str, Any]:
        return {"pid": self.pid, "starttime": self.starttime, "restarts": self.restarts,
                "requested_restarts": self.requested_restarts, "state": self.state, "netns": self.spec.netns,
                "kind": self.spec.kind, "ref": self.spec.ref, "uid": self.spec.uid, "gid": self.spec.gid,
                "log": str(self.log), "ever_ready": self.ever_ready, "last_exit": self.last_exit,
                "last_error": self.last_error, "since": self.since}


class Supervisor:
    def __init__(self, lab: str, specs: list[ProcSpec], state_dir: Path) -> None:
        self.lab, self.files = lab, StateDir(state_dir)
        self.files.logs.mkdir(exist_ok=True)  # no parents: a vanished state dir must stay gone
        self.files.requests.mkdir(exist_ok=True)
        self.children: dict[str, Child] = {}
        for s in specs:
            self.children[s.name] = Child(s, tuple(s.caps), self.files.log(s.name))
        self.stopping = False
        self.requests_pending = True
        self.dirty = True

    # -- logging -------------------------------------------------------------------------------
    def say(self, event: str, **kw: Any) -> None:
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, **kw}
        print(json.dumps(rec, separators=(",", ":")), flush=True)

    # -- state file ----------------------------------------------------------------------------
    def write_state(self) -> None:
        _write_json(self.files.procs, {n: c.record() for n, c in self.children.items()})
        self.dirty = False

    # -- lifecycle of one child ----------------------------------------------------------------
    def start(self, c: Child) -> None:
        c.log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(c.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            marker = {"event": "supervisor", "msg": "starting", "name": c.spec.name, "netns": c.spec.netns,
                      "restarts": c.restarts, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            os.write(fd, (json.dumps(marker, separators=(",", ":")) + "\n").encode())
            c.scan_offset, c.partial = os.fstat(fd).st_size, b""
            c.proc = spawn(c.spec, self.lab, fd, c.caps)
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            c.proc, c.pid, c.starttime, c.last_error = None, None, None, f"spawn failed: {e}"
            self.say("spawn-failed", name=c.spec.name, error=str(e))
            self._schedule_restart(c)
            return
        finally:
            os.close(fd)
        c.pid, c.starttime = c.proc.pid, procfs.starttime(c.proc.pid)
        c.state, c.spawned_at, c.ready_at, c.since = "starting", _now(), None, time.time()
        c.check = ReadyCheck(c.spec, c.spawned_at) if c.spec.run == "exec" else None
        self.say("spawn", name=c.spec.name, pid=c.pid, netns=c.spec.netns)
        self.dirty = True

    def _schedule_restart(self, c: Child) -> None:
        c.restarts += 1
        delay = BACKOFF[min(c.streak, len(BACKOFF) - 1)]
        c.streak += 1
        c.state, c.next_start = "backoff", _now() + delay
        self.dirty = True

    def on_exit(self, c: Child, rc: int) -> None:
        c.last_exit = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(c.pid, signal.SIGKILL)  # leftovers the app forked
        self.say("exit", name=c.spec.name, pid=c.pid, status=c.last_exit)
        c.proc, c.kill_at = None, None
        if c.check is not None:
            c.check.close()
        if self.stopping:
            c.state = "stopped"
        elif c.want_restart:
            c.want_restart = False
            c.requested_restarts += 1
            c.streak = 0
            self.start(c)
        else:
            if c.ready_at is not None and _now() - c.ready_at >= STREAK_RESET:
                c.streak = 0
            self._schedule_restart(c)
        self.dirty = True

    def scan_ready(self, c: Child) -> None:
        """Read what the child wrote since spawn, looking for the ready line (or probe it)."""
        if c.check is not None:
            if c.check.poll(_now()):
                self._ready(c)
            return
        try:
            with open(c.log, "rb") as f:
                f.seek(c.scan_offset)
                data = f.read(1 << 20)
        except FileNotFoundError:
            return
        c.scan_offset += len(data)
        lines = (c.partial + data).split(b"\n")
        c.partial = lines.pop()[-65536:]
        if any(is_ready_line(line) for line in lines):
            self._ready(c)

    def _ready(self, c: Child) -> None:
        c.state, c.ready_at, c.ever_ready, c.last_error = "running", _now(), True, None
        self.say("ready", name=c.spec.name, pid=c.pid, ms=round((c.ready_at - c.spawned_at) * 1000, 1))
        self.dirty = True

    def request_restart(self, c: Child) -> None:
        if c.proc is None:  # waiting in backoff: just start now
            c.requested_restarts += 1
            c.streak = 0
            self.start(c)
            return
        c.want_restart, c.state, c.kill_at = True, "restarting", _now() + STOP_GRACE
        with contextlib.suppress(ProcessLookupError):
            os.killpg(c.pid, signal.SIGTERM)
        self.dirty = True

    def take_requests(self) -> None:
        self.requests_pending = False
        for req in sorted(self.files.requests.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                req.unlink()
            c = self.children.get(req.name)
            if c is None:
                self.say("request-ignored", name=req.name)
                continue
            self.say("restart-requested", name=req.name)
            self.request_restart(c)

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)

        def on_term(signum: int, _f: Any) -> None:
            self.stopping = True

        def on_usr1(signum: int, _f: Any) -> None:
            self.requests_pending = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGUSR1, on_usr1)
        # Caught (not ignored) so they only wake select via the wakeup fd; a caught signal is
        # reset to default across exec, an ignored one (SIG_IGN) would be inherited by children.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGHUP, lambda *_: None)

        for c in self.children.values():
            self.start(c)
        self.write_state()
        while not self.stopping:
            now = _now()
            timeouts = [1.0]
            for c in self.children.values():
                if c.state in ("starting", "restarting"):
                    timeouts.append(READY_POLL)
                if c.state == "backoff":
                    timeouts.append(max(0.0, c.next_start - now))
            with contextlib.suppress(InterruptedError):
                select.select([rfd], [], [], min(timeouts))
            with contextlib.suppress(BlockingIOError):
                while os.read(rfd, 4096):
                    pass
            if self.stopping:
                break
            self.tick()
        self.shutdown()
        return 0

    def tick(self) -> None:
        now = _now()
        for c in self.children.values():
            if c.proc is not None and (rc := c.proc.poll()) is not None:
                self.on_exit(c, rc)
        if self.requests_pending:
            self.take_requests()
        for c in self.children.values():
            if c.state == "starting" and c.proc is not None:
                self.scan_ready(c)
                if c.state == "starting" and now - c.spawned_at > c.spec.ready_timeout:
                    c.last_error = f"not ready within {c.spec.ready_timeout:g}s" + (
                        f" (readiness probe: {c.check.last_error})" if c.check and c.check.last_error else "")
                    self.say("ready-timeout", name=c.spec.name, pid=c.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(c.pid, signal.SIGKILL)
            elif c.state == "restarting" and c.kill_at is not None and now >= c.kill_at and c.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.pid, signal.SIGKILL)
                c.kill_at = None
            elif c.state == "backoff" and now >= c.next_start:
                self.start(c)
        if self.dirty:
            self.write_state()

    def shutdown(self) -> None:
        """SIGTERM every child's process group, wait up to 2 s, SIGKILL the rest."""
        self.say("shutdown")
        live = [c for c in self.children.values() if c.proc is not None]
        for c in live:
            c.state = "stopping"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.pid, signal.SIGTERM)
        deadline = _now() + STOP_GRACE
        while _now() < deadline and any(c.proc.poll() is None for c in live):
            time.sleep(0.01)
        for c in live:
            if c.proc.poll() is None:
                self.say("kill", name=c.spec.name, pid=c.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.pid, signal.SIGKILL)
            rc = c.proc.wait()
            c.last_exit = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.pid, signal.SIGKILL)
            c.proc = None
        for c in self.children.values():
            c.state = "stopped"
        self.write_state()
        self.say("stopped")


def load_specs(path: str | Path) -> list[ProcSpec]:
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of processes")
    specs = [ProcSpec.from_any(d) for d in raw]
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"{path}: duplicate process names {sorted(dup)}")
    return specs


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
        info = _read_json(files.supervisor) or {}
        raise SupervisorError(f"a supervisor (pid {info.get('pid')}) already runs for {state_dir}") from None
    _lock_fd = fd


def _write_pidfile(state_dir: Path, lab: str | None = None) -> None:
    pid = os.getpid()
    _write_json(StateDir(state_dir).supervisor,
                {"pid": pid, "starttime": procfs.starttime(pid), "lab": lab or _lab, "state": "running"})


_lab = ""


def main(argv: list[str] | None = None) -> int:
    global _lab
    p = argparse.ArgumentParser(prog="netlab.runtime.supervisor", description=__doc__.splitlines()[0])
    p.add_argument("--lab", required=True)
    p.add_argument("--spec", required=True, help="JSON list of netlab.plan.types.Process dicts")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--foreground", action="store_true", help="don't daemonize (debugging)")
    a = p.parse_args(argv)
    _lab = a.lab
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
        return sup.run()
    finally:
        info = _read_json(sup.files.supervisor) or {}
        if info.get("pid") == os.getpid():
            info["state"] = "stopped"
            _write_json(sup.files.supervisor, info)


# ---------------------------------------------------------------------------------------------
# client API


def _spec_dicts(processes: Iterable[Any]) -> list[dict[str, Any]]:
    specs = [ProcSpec.from_any(p) for p in processes]
    return [s.to_dict() for s in specs]


def start_supervisor(lab: str, processes: Iterable[Any], state_dir: str | Path, timeout: float = 30.0) -> int:
    """Launch the lab's supervisor daemon; return its PID once every process is ready.

    ``processes``: plan ``Process`` values, ``ProcSpec``s or dicts (dicts may carry the extra
    ProcSpec keys: exec_mode, netns_etc, env, caps, ready_timeout). On failure the supervisor is
    stopped (nothing is left running) and SupervisorError names the process, its log and its
    last log lines.
    """
    sd = Path(state_dir).resolve()
    sd.mkdir(parents=True, exist_ok=True)
    files = StateDir(sd)
    info = _read_json(files.supervisor)
    if info and procfs.alive(info.get("pid"), info.get("starttime")):
        raise SupervisorError(f"lab {lab!r}: a supervisor (pid {info['pid']}) already runs for {sd}")
    specs = _spec_dicts(processes)
    spec_path = files.spec
    _write_json(spec_path, specs)
    with contextlib.suppress(FileNotFoundError):
        files.procs.unlink()
    r = subprocess.run([sys.executable, "-m", "netlab.runtime.supervisor", "--lab", lab, "--spec", str(spec_path),
                        "--state-dir", str(sd)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       cwd="/", close_fds=True, timeout=30)
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
        procs = _read_json(files.procs) or {}
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
    info = _read_json(files.supervisor) or {}
    pid, st = info.get("pid"), info.get("starttime")
    was_running = procfs.alive(pid, st)
    if was_running:
        procfs.kill_checked(pid, st, signal.SIGTERM)
        if procfs.wait_gone([(pid, st)], timeout):
            procfs.kill_checked(pid, st, signal.SIGKILL)
            procfs.wait_gone([(pid, st)], 1.0)
    procs = _read_json(files.procs) or {}
    leftovers = [(e["pid"], e.get("starttime")) for e in procs.values() if procfs.alive(e.get("pid"), e.get("starttime"))]
    if leftovers:
        procfs.terminate(leftovers, grace=STOP_GRACE, group=True)
    return was_running


def restart(state_dir: str | Path, name: str, timeout: float = 10.0) -> int:
    """Ask the supervisor to restart one process; returns its new PID once it is ready again."""
    sd = Path(state_dir)
    files = StateDir(sd)
    info = _read_json(files.supervisor) or {}
    if not procfs.alive(info.get("pid"), info.get("starttime")):
        raise SupervisorError(f"no supervisor running for {sd}")
    procs = _read_json(files.procs) or {}
    if name not in procs:
        raise SupervisorError(f"no process {name!r} (have: {', '.join(sorted(procs))})")
    old_pid, old_req = procs[name].get("pid"), procs[name].get("requested_restarts", 0)
    files.request(name).write_text(f"{time.time()}\n")
    os.kill(info["pid"], signal.SIGUSR1)
    deadline, e = _now() + timeout, procs[name]
    while _now() < deadline:
        e = (_read_json(files.procs) or {}).get(name, {})
        if e.get("state") == "running" and e.get("pid") != old_pid and e.get("requested_restarts", 0) > old_req:
            return int(e["pid"])
        time.sleep(0.02)
    raise SupervisorError(_failure(sd, name, e, f"not ready {timeout:g}s after restart"))


def status(state_dir: str | Path) -> dict[str, Any]:
    """Supervisor and process records, with ``alive`` checked against /proc (PID + starttime)."""
    sd = Path(state_dir)
    files = StateDir(sd)
    info = _read_json(files.supervisor) or {}
    sup_alive = procfs.alive(info.get("pid"), info.get("starttime"))
    procs = _read_json(files.procs) or {}
    for e in procs.values():
        e["alive"] = procfs.alive(e.get("pid"), e.get("starttime"))
    return {"lab": info.get("lab"), "state_dir": str(sd),
            "supervisor": {"pid": info.get("pid"), "alive": sup_alive,
                           "state": info.get("state") if sup_alive else "stopped"},
            "procs": procs}


if __name__ == "__main__":
    sys.exit(main())
