"""The supervisor daemon's loop over a lab's processes: spawn each one in its netns, watch for its
ready line (or probe it), restart it when it exits (first restart immediate, then exponential
backoff), restart it on request, start or stop one on request, stop them all on SIGTERM.

Single-threaded on purpose: ``preexec_fn`` (setns, mounts, privilege drop) is only safe to run
after fork in a process without other threads. Everything a client needs is written to the
lab's state directory (:meth:`Supervisor.write_state`); the process around this loop (daemonizing,
the lock, the client calls) is :mod:`netlab.runtime.supervisor`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab.runtime import forkspawn, procfs
from netlab.runtime.probe import ReadyCheck, is_ready_line
from netlab.runtime.spawn import ProcSpec, spawn
from netlab.state import StateDir, write_record

BACKOFF = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)  # delay before the Nth consecutive restart
STREAK_RESET = 10.0  # a process that stayed ready this long starts a fresh backoff streak
STOP_GRACE = 2.0
READY_POLL = 0.01

_now = time.monotonic


@dataclass
class Child:
    spec: ProcSpec
    caps: tuple[str, ...]
    log: Path
    proc: subprocess.Popen[bytes] | forkspawn.Forked | None = None
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
        write_record(self.files.procs, {n: c.record() for n, c in self.children.items()})
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
            forked = forkspawn.eligible(c.spec)
            c.proc = (forkspawn.spawn_forked if forked else spawn)(c.spec, self.lab, fd, c.caps)
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
        self.say("spawn", name=c.spec.name, pid=c.pid, netns=c.spec.netns, how="fork" if forked else "exec")
        self.dirty = True

    def _schedule_restart(self, c: Child) -> None:
        c.restarts += 1
        delay = BACKOFF[min(c.streak, len(BACKOFF) - 1)]
        c.streak += 1
        c.state, c.next_start = "backoff", _now() + delay
        self.dirty = True

    def on_exit(self, c: Child, rc: int) -> None:
        c.last_exit = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
        _killpg(c.pid, signal.SIGKILL, PermissionError)  # leftovers the app forked
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
        _killpg(c.pid, signal.SIGTERM)
        self.dirty = True

    def take_requests(self) -> None:
        """Each file ``requests/<name>`` is one request: a restart (any body that is not a JSON
        object: the timestamp `restart` writes), or ``{"op": "start", "spec": {...}}`` /
        ``{"op": "stop"}``: a process added to or removed from a running lab (`netlab waypoint`)."""
        self.requests_pending = False
        for req in sorted(self.files.requests.iterdir()):
            try:
                body = req.read_bytes()[:1 << 16]
                req.unlink()
            except FileNotFoundError:
                continue
            op = _request_op(body)
            c = self.children.get(req.name)
            if op is not None and op.get("op") == "start" and c is None:
                self.add_child(req.name, op.get("spec"))
                continue
            if c is None:
                self.say("request-ignored", name=req.name)
                continue
            if op is not None and op.get("op") == "stop":
                self.remove_child(c)
                continue
            self.say("restart-requested", name=req.name)
            self.request_restart(c)

    def add_child(self, name: str, spec: Any) -> None:
        """A process added to the lab while it runs: supervised from now on like the others."""
        try:
            s = ProcSpec.from_any(spec)
            if s.name != name:
                raise ValueError(f"spec names {s.name!r}")
        except (TypeError, ValueError) as e:
            self.say("request-ignored", name=name, error=str(e))
            return
        self.say("start-requested", name=name)
        c = self.children[name] = Child(s, tuple(s.caps), self.files.log(name))
        self.start(c)

    def remove_child(self, c: Child) -> None:
        """Stop a process for good (SIGTERM, SIGKILL after the grace) and forget it."""
        self.say("stop-requested", name=c.spec.name)
        self.children.pop(c.spec.name, None)
        if c.proc is not None:
            _killpg(c.pid, signal.SIGTERM)
            try:
                c.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                _killpg(c.pid, signal.SIGKILL)
                c.proc.wait()
            _killpg(c.pid, signal.SIGKILL, PermissionError)
        if c.check is not None:
            c.check.close()
        self.dirty = True

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

        # the exec'd ones first: their cold interpreters start on the other CPU while this one
        # imports what the forked ones run (forkspawn.preload), then forks them
        forked = [c for c in self.children.values() if forkspawn.eligible(c.spec)]
        for c in self.children.values():
            if not forkspawn.eligible(c.spec):
                self.start(c)
        failed = forkspawn.preload(c.spec for c in forked)
        if failed:
            self.say("preload-failed", modules=failed)
        for c in forked:
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
        self.shutdown(rfd)
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
                    _killpg(c.pid, signal.SIGKILL)
            elif c.state == "restarting" and c.kill_at is not None and now >= c.kill_at and c.pid:
                _killpg(c.pid, signal.SIGKILL)
                c.kill_at = None
            elif c.state == "backoff" and now >= c.next_start:
                self.start(c)
        if self.dirty:
            self.write_state()

    def shutdown(self, wakeup: int | None = None) -> None:
        """SIGTERM every child's process group, wait up to 2 s, SIGKILL the rest.

        ``wakeup``: the read end of the signal wakeup pipe, which each child's SIGCHLD writes
        to: the wait ends at the last exit, not at the next tick of a poll (`down` waits for
        this daemon to be gone)."""
        self.say("shutdown")
        live = [(c, c.proc) for c in self.children.values() if c.proc is not None]
        for c, _ in live:
            c.state = "stopping"
            _killpg(c.pid, signal.SIGTERM)
        deadline = _now() + STOP_GRACE
        while any(proc.poll() is None for _, proc in live):
            left = deadline - _now()
            if left <= 0:
                break
            if wakeup is None:
                time.sleep(min(left, 0.01))
                continue
            with contextlib.suppress(InterruptedError):
                select.select([wakeup], [], [], min(left, 0.05))  # 0.05: a lost wakeup costs no more
            with contextlib.suppress(BlockingIOError):
                while os.read(wakeup, 4096):
                    pass
        for c, proc in live:
            if proc.poll() is None:
                self.say("kill", name=c.spec.name, pid=c.pid)
                _killpg(c.pid, signal.SIGKILL)
            rc = proc.wait()
            c.last_exit = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
            _killpg(c.pid, signal.SIGKILL, PermissionError)
            c.proc = None
        for c in self.children.values():
            c.state = "stopped"
        self.write_state()
        self.say("stopped")


def _request_op(body: bytes) -> dict[str, Any] | None:
    try:
        d = json.loads(body)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def _killpg(pid: int | None, sig: int, *also: type[OSError]) -> None:
    """Signal the process group of a child (it and what it forked), if it is still there."""
    if pid:
        with contextlib.suppress(ProcessLookupError, *also):
            os.killpg(pid, sig)


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
