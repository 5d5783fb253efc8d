"""One structured line per connection leg, so `netlab trace` can join a proxy's two TCP legs.

A leg is what a proxy did with one accepted connection: where it came from (``src``), where the
client meant to go (``orig_dst``), the upstream connection it opened (``up_src`` -> ``up_dst``),
how (``proto``: tcp | hbone), who the peers were (``src_id``/``dst_id``), bytes each way and how it
ended. The downstream 4-tuple of one leg equals the upstream 4-tuple of the previous proxy's leg,
which is the join key. Lines are JSON, appended to ``<state>/conn/<component>.jsonl``.

Who may write where (netlab runs as root next to other users): ``conn/`` belongs to root and is
writable by nobody else. ``up`` creates each proxy's two files there before the proxy starts
(:func:`prepare`), owned by the uid the proxy runs as (1337 for sidecars), and a proxy opens them
with ``O_NOFOLLOW`` and without ``O_CREAT``: no one can plant a file or a symlink for root to
append to, and a proxy cannot create anything in the directory.

Size (``/run`` is memory): a proxy writes ``<component>.jsonl`` until it holds
:data:`MAX_FILE_BYTES`, then empties ``<component>.jsonl.1`` and writes there, and so on, back
and forth. So a component keeps between one and two files' worth of its newest legs (at most
2 x 2 MiB, about 4,500-9,000 legs), never more. The two files already exist, so switching needs
no rename or create in ``conn/``. A file the writer switched to starts with a line
``{"generation": N}`` (one more than the other file's), which is how readers know which file is
older (modification times are too coarse: both files change within one clock tick). Readers
(:func:`read_legs`, :class:`LegFollower`) read both, older file first, and skip (and count)
lines that are not a leg.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from netlab import state

#: Bytes per connection-log file before the writer switches to the other one (see module doc).
MAX_FILE_BYTES = 2 << 20
ROTATED_SUFFIX = state.CONN_ROTATED_SUFFIX
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO must not hang root


Leg = state.ConnLeg  # the record: netlab.state owns it (the readers there read it back)


def addr(a: Any) -> str:
    """``("10.0.1.3", 4242)`` -> ``"10.0.1.3:4242"``."""
    if not a:
        return ""
    return f"{a[0]}:{a[1]}"


def files_of(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """A component's two files: ``<component>.jsonl`` and ``<component>.jsonl.1``."""
    p = Path(path)
    return p, p.with_name(p.name + ROTATED_SUFFIX)


# ---- the lab's side: files made before the writer starts --------------------------------------
def prepare(path: str | os.PathLike[str], uid: int = 0, gid: int = 0) -> None:
    """Create (or adopt) a component's two files, owned by ``uid:gid``, mode 0644.

    Called by ``up`` as root in the root-owned ``conn/`` directory. An existing entry is adopted
    only if it is a regular file with one link (opened with ``O_NOFOLLOW``): anything else is
    an error, never followed.
    """
    for f in files_of(path):
        try:
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o644)
        except FileExistsError:
            fd = os.open(f, os.O_WRONLY | _OPEN_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise OSError(f"{f}: not a plain file (mode {st.st_mode:o}, {st.st_nlink} links); not using it")
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)


# ---- the writer ---------------------------------------------------------------------------------
class ConnLog:
    """Append-only writer of one component's legs, alternating between its two files."""

    def __init__(self, path: str | os.PathLike[str] | None, max_bytes: int = MAX_FILE_BYTES) -> None:
        self.path = Path(path) if path else None
        self.max_bytes = max_bytes
        self._fds: list[int] = []
        self._cur = 0
        self._size = 0
        self._gen = 0
        if self.path is None:
            return
        try:
            for f in files_of(self.path):
                fd = os.open(f, os.O_RDWR | os.O_APPEND | _OPEN_FLAGS)  # no O_CREAT: `up` made it
                self._fds.append(fd)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(f"{f}: not a regular file")
                os.set_blocking(fd, True)
        except FileNotFoundError as e:
            self.close()
            raise FileNotFoundError(f"connection log {e.filename} was not prepared by `netlab up` "
                                    "(netlab.mesh.connlog.prepare)") from None
        except BaseException:
            self.close()
            raise
        # go on where the previous run of this component stopped: the newer file
        gens = [_generation(os.pread(fd, _HEAD, 0)) for fd in self._fds]
        self._cur = 1 if gens[1] > gens[0] else 0
        self._gen = gens[self._cur]
        self._size = os.fstat(self._fds[self._cur]).st_size

    def write(self, leg: Leg) -> None:
        if not self._fds:
            return
        d = asdict(leg)
        d["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(leg.start)) + f".{int(leg.start * 1000) % 1000:03d}Z"
        if not d["extra"]:
            del d["extra"]
        line = (json.dumps(d, separators=(",", ":")) + "\n").encode()
        if self._size and self._size + len(line) > self.max_bytes:
            self._cur ^= 1
            self._gen += 1
            os.ftruncate(self._fds[self._cur], 0)
            line = f'{{"generation":{self._gen}}}\n'.encode() + line
            self._size = 0
        os.write(self._fds[self._cur], line)  # one write: atomic append
        self._size += len(line)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


# ---- readers -------------------------------------------------------------------------------------
_STR_FIELDS = ("component", "listener", "src", "orig_dst", "local", "up_src", "up_dst", "proto", "authority",
               "src_id", "dst_id", "outcome", "time")
_NUM_FIELDS = ("start", "duration_ms", "bytes_up", "bytes_down")
_REQUIRED = ("component", "listener", "src", "orig_dst")
_HEAD = 64  # bytes that hold a file's generation line


def _generation(head: bytes) -> int:
    """The generation of a file from its first bytes (0: a file never switched to)."""
    if not head.startswith(b'{"generation":'):
        return 0
    try:
        d = json.loads(head.split(b"\n", 1)[0])
    except ValueError:
        return 0
    g = d.get("generation") if isinstance(d, dict) else None
    return g if isinstance(g, int) and not isinstance(g, bool) else 0


def parse_leg(line: bytes | str) -> dict[str, Any] | None:
    """A leg from one log line, or None if the line is not one (bad JSON, wrong field types):
    readers format and sort these fields, so a line that would break them is no leg."""
    try:
        d = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(d, dict) or any(k not in d for k in _REQUIRED):
        return None
    if any(k in d and not isinstance(d[k], str) for k in _STR_FIELDS):
        return None
    if any(k in d and (isinstance(d[k], bool) or not isinstance(d[k], (int, float))) for k in _NUM_FIELDS):
        return None
    if "extra" in d and not isinstance(d["extra"], dict):
        return None
    return d


def _read_file(f: Path, offset: int = 0, limit: int = 2 * MAX_FILE_BYTES) -> bytes:
    """Up to ``limit`` bytes of ``f`` from ``offset`` (empty if it is missing); never follows a
    symlink, never blocks on a FIFO (a writer only ever writes one file's worth)."""
    try:
        fd = os.open(f, os.O_RDONLY | _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        os.lseek(fd, offset, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(limit)
    finally:
        os.close(fd)


def _parse_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    legs, bad = [], 0
    for line in data.splitlines():
        if not line.strip() or (line.startswith(b'{"generation":') and _generation(line)):
            continue
        leg = parse_leg(line)
        if leg is None:
            bad += 1
        else:
            legs.append(leg)
    return legs, bad


def _oldest_first(files: Iterable[Path]) -> list[Path]:
    """A component's files, the one switched to earlier first (a lower generation)."""
    return sorted(files, key=lambda f: _generation(_read_file(f, 0, _HEAD)))


def read_legs_counted(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """(legs, lines skipped) of a component's log: both of its files, older first."""
    legs: list[dict[str, Any]] = []
    bad = 0
    for f in _oldest_first(files_of(path)):
        got, n = _parse_lines(_read_file(f))
        legs += got
        bad += n
    return legs, bad


def read_legs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The legs of a component's log (both files, oldest first); lines that are no leg are skipped."""
    return read_legs_counted(path)[0]


def components(conn_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """component -> its log path (``<component>.jsonl``) in a lab's ``conn/`` directory."""
    d = Path(conn_dir)
    return {f.name[: -len(state.CONN_SUFFIX)]: f for f in sorted(d.glob(f"*{state.CONN_SUFFIX}"))} if d.is_dir() else {}


class LegFollower:
    """New legs of a set of components since construction (``netlab trace`` polls this).

    Per file it remembers how far it read and its generation; a file with another generation
    (or shorter than that) was emptied by the writer switching to it, and is read from its start.
    """

    def __init__(self, paths: dict[str, Path]) -> None:
        self.files = [f for p in paths.values() for f in files_of(p)]
        self.offsets = {f: _size(f) for f in self.files}
        self.gens = {f: _generation(_read_file(f, 0, _HEAD)) for f in self.files}
        self.skipped = 0

    def poll(self) -> list[dict[str, Any]]:
        legs: list[dict[str, Any]] = []
        pairs = [self.files[i:i + 2] for i in range(0, len(self.files), 2)]
        for f in [f for pair in pairs for f in _oldest_first(pair)]:
            gen = _generation(_read_file(f, 0, _HEAD))
            if gen != self.gens[f] or _size(f) < self.offsets[f]:  # the writer switched to it: all new
                self.gens[f], self.offsets[f] = gen, 0
            data = _read_file(f, self.offsets[f])
            end = data.rfind(b"\n") + 1  # a half-written line waits for the next poll
            self.offsets[f] += end
            got, bad = _parse_lines(data[:end])
            legs += got
            self.skipped += bad
        return legs


def _size(f: Path) -> int:
    try:
        return os.stat(f, follow_symlinks=False).st_size
    except OSError:
        return 0
