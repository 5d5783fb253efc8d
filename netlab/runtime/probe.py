"""When is a pod's own program ready? The readiness checks of ``run="exec"`` processes.

netlab's own programs print a JSON ready line once they listen; a program a topology names
(``command``) knows nothing of that, so the supervisor looks from outside, as a kubelet would:

* with ``readiness: {port, path}``: a TCP connect to the port from *inside the pod's netns*, to
  127.0.0.1 and then the pod's IP in turn (a program may bind either), and with a path an
  ``HTTP/1.0 GET`` that must answer 200-399 (Kubernetes' ``httpGet`` success range);
* without: the program is ready once it has stayed alive ``ALIVE_GRACE`` seconds, so a command
  that dies at once (a typo, a missing module) fails ``up`` instead of passing it.

Why non-blocking: the supervisor is one thread serving every process of the lab; a probe must
never make it wait, so each ``poll`` does at most one connect, one send or one read, and returns.
The probe's socket is opened inside the pod's netns (the thread hops in and back, see
``netlab.netns``) and then lives there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import socket
from typing import Any

from netlab.netns import in_netns

ALIVE_GRACE = 0.25  # s a probe-less program must stay up before it counts as ready
INTERVAL = 0.1  # s between failed attempts
ATTEMPT_TIMEOUT = 1.0  # s one attempt (connect + answer) may take
_STATUS = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})")


class ReadyCheck:
    """The readiness check of one spawn of one process (``spec``: a ProcSpec with ``run="exec"``)."""

    def __init__(self, spec: Any, spawned_at: float) -> None:
        self.netns, self.port, self.path = spec.netns, spec.ready_port, spec.ready_path
        self.hosts: tuple[str, ...] = spec.ready_hosts
        self.spawned_at = spawned_at
        self.sock: socket.socket | None = None
        self.attempt = 0
        self.next_at = spawned_at
        self.deadline = 0.0
        self.reading = False
        self.buf = b""
        self.last_error = ""

    def poll(self, now: float) -> bool:
        """True once the process is ready; never blocks."""
        if not self.port:
            return now - self.spawned_at >= ALIVE_GRACE
        try:
            if self.sock is None:
                if now < self.next_at:
                    return False
                self._open(now)
            return self._step(now)
        except OSError as e:
            self._fail(now, e.strerror or str(e))
            return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _open(self, now: float) -> None:
        host = self.hosts[self.attempt % len(self.hosts)]
        self.attempt += 1
        with in_netns(self.netns) if self.netns else contextlib.nullcontext():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        err = s.connect_ex((host, self.port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(err, f"connect {host}:{self.port}: {os.strerror(err)}")
        self.sock, self.deadline, self.reading, self.buf = s, now + ATTEMPT_TIMEOUT, False, b""
        self.host = host

    def _step(self, now: float) -> bool:
        s = self.sock
        assert s is not None
        if now > self.deadline:
            raise OSError(errno.ETIMEDOUT, f"{self.host}:{self.port}: no answer within {ATTEMPT_TIMEOUT:g}s")
        if not self.reading:
            if not select.select([], [s], [], 0)[1]:
                return False
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect {self.host}:{self.port}: {os.strerror(err)}")
            if not self.path:
                self.close()
                return True
            s.send(f"GET {self.path} HTTP/1.0\r\nHost: {self.host}:{self.port}\r\n"
                   "User-Agent: netlab-readiness\r\n\r\n".encode())
            self.reading = True
        if not select.select([s], [], [], 0)[0]:
            return False
        data = s.recv(4096)
        self.buf += data
        if b"\r\n" not in self.buf and data and len(self.buf) < 8192:
            return False
        m = _STATUS.match(self.buf)
        if m and 200 <= int(m.group(1)) < 400:
            self.close()
            return True
        raise OSError(errno.EPROTO, f"GET {self.path} on {self.host}:{self.port}: "
                      + (f"status {int(m.group(1))}" if m else "no HTTP status line"))

    def _fail(self, now: float, why: str) -> None:
        self.close()
        self.last_error = why
        self.next_at = now + INTERVAL


def is_ready_line(line: bytes) -> bool:
    """The ready line of netlab's own programs: a JSON object with ``"event": "ready"``."""
    line = line.strip()
    if not line.startswith(b"{") or b"ready" not in line:
        return False
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("event") == "ready"
