"""Giving freed heap back to the system once a burst of connections is over.

A burst peaks at (connections x bytes in flight): TLS buffers, h2 frames, relayed chunks. glibc
keeps what they freed (fragmented heap, raised mmap threshold), so a proxy's RSS stayed at the
burst's peak after every connection was gone. A proxy process turns this on once
(:func:`enable`); every stream endpoint made then calls :func:`watch` with the loop it lives on
and a function that counts the endpoints made and finished so far.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

IDLE_TRIM_S = 0.5

_trim_interval: float | None = None  # None: not enabled (the default, e.g. in tests and the CLI)
_trim_loop: asyncio.AbstractEventLoop | None = None
_malloc_trim: Any = None  # libc's malloc_trim, False where there is none


def enable(interval: float = IDLE_TRIM_S) -> bool:
    """Call glibc ``malloc_trim(0)`` when a burst of connections is over.

    Checked every ``interval`` s on the loop of the first endpoint made: it trims when
    endpoints finished since the last trim and now none is open, or none was made or finished
    during the last interval. So at most once per interval, and not at all while connections
    keep coming and going. Returns False where there is no ``malloc_trim`` (not glibc).
    """
    global _trim_interval, _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _trim_interval = interval
    return True


def watch(loop: asyncio.AbstractEventLoop, counts: Callable[[], tuple[int, int]]) -> None:
    """Arm the idle check on ``loop`` (once per loop; nothing unless :func:`enable` was called).

    ``counts()`` returns (endpoints made, endpoints finished) in this process.
    """
    global _trim_loop
    if _trim_interval is None or _trim_loop is loop:
        return
    _trim_loop = loop
    seen, trimmed = (-1, -1), counts()[1]

    def tick() -> None:
        nonlocal seen, trimmed
        if _trim_loop is not loop or loop.is_closed():
            return
        now = counts()
        if now[1] != trimmed and (now[0] == now[1] or now == seen):
            trimmed = now[1]
            _malloc_trim(0)
        seen = now
        loop.call_later(_trim_interval or IDLE_TRIM_S, tick)

    loop.call_later(_trim_interval, tick)
