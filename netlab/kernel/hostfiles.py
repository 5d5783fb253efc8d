"""Apply's last phase: the host files a plan writes (a pod's ``/etc/netns/<netns>/hosts``), each
recorded in the ledger with its identity (device, inode) so destroy removes only what it made.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from netlab.kernel.failures import ObjectError
from netlab.kernel.ledger import Ledger
from netlab.plan.types import File

Progress = Callable[[str, int, int], None]


def write_files(files: Sequence[File], ledger: Ledger, progress: Progress | None = None) -> None:
    """Each file with the directories it needs (recorded as made), in plan order."""
    if progress and files:
        progress("files", 0, len(files))
    for i, f in enumerate(files):
        try:
            for d in missing_parents(Path(f.path)):
                os.mkdir(d, 0o755)  # FileExistsError: made meanwhile by someone else: not ours
                st = os.lstat(d)
                ledger.mkdir(str(d), st.st_dev, st.st_ino)
            write_new_file(f, ledger)
        except OSError as e:
            raise ObjectError(f, e) from e
        if progress:
            progress("files", i + 1, len(files))


def write_new_file(f: File, ledger: Ledger) -> None:
    """Make ``f.path`` with its content, refusing a path that exists (someone else's, or a
    symlink planted there). The file is made unnamed (O_TMPFILE) and recorded with its identity
    before it is linked to its name, so destroy can tell it from whatever else takes that name;
    it also never shows half-written. Where the filesystem has no O_TMPFILE it is created under
    its name (O_EXCL) and recorded right after (a kill in between leaves a file destroy does
    not claim)."""
    data = f.content.encode()
    parent = os.path.dirname(f.path)
    try:
        fd = os.open(parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            st = os.fstat(fd)
            ledger.file(f, st.st_dev, st.st_ino)
            os.write(fd, data)
        finally:
            os.close(fd)
        return
    try:
        os.fchmod(fd, 0o644)  # (the umask applied to the mode above)
        os.write(fd, data)
        st = os.fstat(fd)
        ledger.file(f, st.st_dev, st.st_ino)
        # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/<fd>: EEXIST if the name is taken, symlink
        # or not (os.link without a dir fd would call link(), which links the magic link itself)
        proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(str(fd), f.path, src_dir_fd=proc_fd)
        finally:
            os.close(proc_fd)
    finally:
        os.close(fd)


def missing_parents(path: Path) -> list[Path]:
    """The directories above ``path`` that do not exist, outermost first."""
    out = []
    d = path.parent
    while not d.exists():
        out.append(d)
        d = d.parent
    return list(reversed(out))
