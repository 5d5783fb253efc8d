"""``forkspawn.Forked`` stands in for ``subprocess.Popen`` in the supervisor: stopping one process
(``netlab waypoint rm``) waits a grace period with ``wait(timeout)`` and escalates to SIGKILL on
``TimeoutExpired``, so a forked child must honour the timeout as Popen does (it took no argument,
and the daemon's stop of a forked proxy raised TypeError)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from netlab.runtime.forkspawn import Forked


def test_wait_with_a_timeout_raises_then_reaps_after_the_kill() -> None:
    pid = os.fork()
    if pid == 0:  # the child: sleep until killed
        time.sleep(30)
        os._exit(0)
    child = Forked(pid)
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.2)
    assert 0.2 <= time.monotonic() - t0 < 2.0
    assert child.poll() is None
    os.kill(pid, signal.SIGKILL)
    assert child.wait(5) == -signal.SIGKILL
    assert child.wait() == -signal.SIGKILL  # reaped once, remembered
