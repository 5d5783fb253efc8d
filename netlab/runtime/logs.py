"""Reading component logs for `netlab logs [-f] COMPONENT`.

Components are the supervised process names (each has a log in the state directory's ``logs/``)
plus ``supervisor`` (the daemon's own log). Reading from the end in blocks keeps ``tail -n``
cheap on big logs (sink and httpbin write a line per connection/request).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from netlab.state import StateDir

SUPERVISOR = "supervisor"  # the component name of the supervisor daemon's own log


def component_path(state_dir: str | Path, component: str) -> Path:
    sd = StateDir(Path(state_dir))
    if component == SUPERVISOR:
        return sd.supervisor_log
    if not component or "/" in component or component.startswith("."):
        raise ValueError(f"bad component name {component!r}")
    return sd.log(component)


def components(state_dir: str | Path) -> list[str]:
    """Every component that has a log, supervisor first."""
    sd = StateDir(Path(state_dir))
    return ([SUPERVISOR] if sd.supervisor_log.exists() else []) + sd.log_names()


def last_lines(path: str | Path, n: int, block: int = 8192, end: int | None = None) -> list[str]:
    """The last ``n`` lines of a file (without newlines), reading backwards from ``end``
    (default: the end of the file)."""
    if n <= 0:
        return []
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return []
    with f:
        size = f.seek(0, os.SEEK_END)
        end = size if end is None else min(end, size)
        pos, buf = end, b""
        while pos > 0 and buf.count(b"\n") <= n:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(min(step, end - pos)) + buf
    lines = buf.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln.decode("utf-8", "replace") for ln in lines[-n:]]


def tail(state_dir: str | Path, component: str, n: int = 20, follow: bool = False,
         poll: float = 0.2, stop: Callable[[], bool] | None = None) -> Iterator[str]:
    """Yield the last ``n`` lines of a component's log; with ``follow``, keep yielding new lines.

    Following survives truncation (starts over from the top) and waits for a log that does not
    exist yet. It ends when ``stop()`` returns True (or never, for a CLI that is Ctrl-C'd).
    """
    path = component_path(state_dir, component)
    if not follow and not path.exists():
        sd = Path(state_dir)
        raise FileNotFoundError(f"no log for {component!r} in {sd} (components: {', '.join(components(sd)) or 'none'})")
    try:
        offset = path.stat().st_size  # taken before yielding: lines appended later are "new"
    except FileNotFoundError:
        offset = 0
    # A last line without its newline yet is held back and completed by the follow loop.
    head = last_lines(path, n + 1, end=offset) if follow else last_lines(path, n, end=offset)
    partial = b""
    if follow and offset:
        with open(path, "rb") as f:
            f.seek(offset - 1)
            if f.read(1) != b"\n":
                partial = head.pop().encode() if head else b""
        head = head[-n:] if n > 0 else []
    yield from head
    if not follow:
        return
    while not (stop and stop()):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < offset:  # truncated or replaced
            offset, partial = 0, b""
        if size > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size - offset)
            offset += len(data)
            parts = (partial + data).split(b"\n")
            partial = parts.pop()
            for ln in parts:
                yield ln.decode("utf-8", "replace")
            continue
        time.sleep(poll)
