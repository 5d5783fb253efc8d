"""Starting a supervised Python program by forking the supervisor, which imported it already.

Why: a lab's processes are mostly Python programs of this package (a node's two userspace Geneve
relays, its ztunnel, the sample apps). Started with fork + exec, each pays for a cold
interpreter and its imports, ~70-100 ms of CPU apiece; a 20-node lab starts 61 of them at once
on two cores and `up` waited seconds for them (issue 24). Here the supervisor imports each
program's module once (:func:`preload`), then each start is a fork: the child enters its netns
exactly as :func:`netlab.runtime.spawn.make_preexec` makes an exec'd child do, takes its own
stdout/stderr (the log), environment and argv, and calls the imported module's ``main()``
(what its ``if __name__ == "__main__"`` line runs; a module without one runs as ``__main__``
through ``runpy``).

Supervision does not change: the child is the supervisor's child, in its own session and
process group, with the parent-death signal armed; :class:`Forked` answers ``poll``/``wait``
as a ``subprocess.Popen`` does, so restarts, stops and the records are the same code. Its
``/proc/<pid>/cmdline`` is rewritten to ``python -m <module> <args>`` (:func:`set_cmdline`), so
``ps`` and the per-process stats name the program, and nothing mistakes it for a supervisor.

Only what an exec would not make safer takes this path (:func:`eligible`): programs that run as
root without a private mount view. A process dropped to another uid (sidecars: uid 1337) is
still exec'd: its exec with a real gid other than its effective gid is what makes it
non-dumpable from its first instruction (see :mod:`netlab.runtime.spawn`), and its view of the
file system must not hold what the supervisor imported. ``NETLAB_FORK_SPAWN=0`` in the
environment of `up` turns the path off (every process exec'd as before).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import io
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from netlab import child_setup
from netlab.runtime.spawn import ProcSpec, child_env, make_preexec

ENV = "NETLAB_FORK_SPAWN"
#: what the supervisor catches; an exec would reset them (SIGPIPE stays ignored, as Python sets it)
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD, signal.SIGHUP)


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def eligible(spec: ProcSpec) -> bool:
    """A ``python -m`` program of root's, in the supervisor's mount namespace (see module doc)."""
    return (enabled() and spec.run == "module" and spec.exec_mode == "setns" and not spec.uid and not spec.gid
            and not spec.caps and not spec.private_view and not spec.netns_etc)


def _main_module(name: str) -> str:
    """What ``python -m name`` runs: a package's ``__main__``, else the module itself."""
    spec = importlib.util.find_spec(name)
    return f"{name}.__main__" if spec is not None and spec.submodule_search_locations is not None else name


def preload(specs: Iterable[ProcSpec]) -> dict[str, str]:
    """Import, in the supervisor, the module of every eligible spec; returns {module: why} for
    those that failed (their children import them themselves and show the error in their log)."""
    return preload_modules(s.argv[0] for s in specs if eligible(s))


def preload_modules(names: Iterable[str]) -> dict[str, str]:
    """:func:`preload` by module name (the early supervisor's ``--preload``; ``-``: none)."""
    failed: dict[str, str] = {}
    wanted = sorted(set(names) - {"-", ""})
    for name in wanted:
        try:
            importlib.import_module(_main_module(name))
        except Exception as e:  # noqa: BLE001 - the child reports it where the user looks: its log
            failed[name] = f"{type(e).__name__}: {e}"
    for name in child_setup.LATE_IMPORTS if wanted else ():
        with contextlib.suppress(ImportError):  # (uvloop is optional)
            importlib.import_module(name)
    return failed


class Forked:
    """The ``subprocess.Popen`` surface the supervisor uses, for a forked child."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """As ``Popen.wait``: block until the child ends or, with ``timeout``, raise
        ``subprocess.TimeoutExpired`` (the daemon's stop of one process waits a grace period)."""
        if timeout is not None:
            deadline = time.monotonic() + timeout
            while self.poll() is None:
                if time.monotonic() >= deadline:
                    raise subprocess.TimeoutExpired(str(self.pid), timeout)
                time.sleep(0.01)
            return self.returncode if self.returncode is not None else -1
        while self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                self.returncode = -1
                break
            except InterruptedError:
                continue
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def set_cmdline(argv: list[str]) -> None:
    """Overwrite this process's argument area (what ``/proc/self/cmdline`` shows) with ``argv``,
    cut to the area's size. The area is the one exec gave the supervisor; writing it through
    ``/proc/self/mem`` is what ``setproctitle`` does, without the dependency."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    start, end = int(fields[48 - 3]), int(fields[49 - 3])  # arg_start, arg_end (proc(5): fields 48, 49)
    if not 0 < end - start < 1 << 20:
        return
    text = b"\0".join(a.encode("utf-8", "replace") for a in argv)[:end - start - 1]
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        mem.write(text + b"\0" * (end - start - len(text)))


_KEPT: list[object] = []


def _std_streams() -> None:
    """Fresh unbuffered stdout/stderr on fds 1 and 2 (PYTHONUNBUFFERED, as an exec'd child has).
    The supervisor's own stream objects are kept alive: they own fds 1 and 2 (``os.fdopen``),
    and collecting them would close the child's log."""
    _KEPT.extend((sys.stdin, sys.stdout, sys.stderr))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True, write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True, write_through=True)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")


def spawn_forked(spec: ProcSpec, lab: str, log_fd: int, caps: tuple[str, ...] = ()) -> Forked:
    """Fork a child that runs ``spec``'s module with stdout+stderr on ``log_fd``; nothing else of
    the supervisor's fds is kept. A failure to enter the netns is written to the log and the
    child exits 70, which the supervisor handles as any early exit (backoff, restart)."""
    env = child_env(spec, lab)
    preexec = make_preexec(spec, caps, os.getpid(), None)
    argv = [sys.executable, "-m", *spec.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return Forked(pid)
    code = 70
    try:  # the child: never returns into the supervisor's stack
        signal.set_wakeup_fd(-1)
        for sig in _HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        _close_high_fds()
        os.chdir("/")
        preexec()
        os.environ.clear()
        os.environ.update(env)
        _std_streams()
        try:
            set_cmdline(argv)
        except OSError:  # cosmetic: ps then shows the supervisor's command line
            pass
        sys.argv = [argv[2], *spec.argv[1:]]
        code = 1
        entry = _preloaded_main(spec.argv[0])
        if entry is not None:
            raise SystemExit(entry())
        for name in (spec.argv[0], f"{spec.argv[0]}.__main__"):  # runs as __main__, as with -m
            sys.modules.pop(name, None)
        runpy.run_module(spec.argv[0], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - the child's own traceback, in its log, as an exec'd one
        traceback.print_exc()
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _preloaded_main(name: str) -> Callable[[], Any] | None:
    """The ``main`` of a program module the supervisor imported (preload), if it has one.

    Every program of ours ends in ``if __name__ == "__main__": sys.exit(main())``; calling that
    ``main`` of the imported module is what ``python -m`` would run, without running the
    module's top level a second time (runpy re-executes it: 4.5 ms of a Geneve relay's 8 ms of
    start-up CPU, its dataclasses rebuilt, x40 relays in a 20-node lab)."""
    mod = sys.modules.get(_main_module(name))
    entry = getattr(mod, "main", None)
    return entry if callable(entry) else None


def _close_high_fds() -> None:
    """Close every fd above 2 (the supervisor's lock, wakeup pipe, log fd): listed, not a
    ``closerange`` up to a limit the lab raised to 2**20."""
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass
