"""Deterministic crash and pause points for tests, armed by one environment variable.

``NETLAB_TEST_SIGNAL_AT="<SIG>@<point>"`` makes the process send itself ``SIG<SIG>`` when it
reaches ``<point>``: ``KILL@netns:lab-node-b`` dies just before taking that namespace name (its
ledger record is written, the namespace does not exist yet), ``STOP@runtime`` freezes `up`
before it starts the lab's processes, ``STOP@down`` freezes `down` after it stopped the lab's
processes and before it removes kernel objects. Random kill times cannot hit a window of microseconds;
these can. Unset (always, outside tests), a point costs one truth test of a module constant.
"""

from __future__ import annotations

import os
import signal

_SIG, _, _POINT = os.environ.get("NETLAB_TEST_SIGNAL_AT", "").partition("@")
ARMED = bool(_POINT)


def point(name: str) -> None:
    """Signal this process if the test armed ``name``; callers check :data:`ARMED` first."""
    if ARMED and name == _POINT:
        os.kill(os.getpid(), getattr(signal, f"SIG{_SIG}"))
