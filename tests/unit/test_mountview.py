"""The private file-system view of a process dropped to another uid (issue 17, item 3): which
directories get covered and what is bound back, computed from the host's real modes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.runtime.mountview import Op, plan_view

UID = GID = 1337


@pytest.fixture
def tree() -> Iterator[Path]:
    """``home`` (0700, like /root) holding an interpreter, and a lab state directory, in a
    directory uid 1337 can enter (pytest's own tmp_path is under a 0700 directory)."""
    t = Path(tempfile.mkdtemp(prefix="hmv-", dir="/tmp")).resolve()
    os.chmod(t, 0o755)
    (t / "home" / "pyenv" / "lib").mkdir(parents=True)
    (t / "home" / "secret").write_text("root's\n")
    (t / "home" / "pyenv" / "lib" / "os.py").write_text("")
    os.chmod(t / "home", 0o700)
    for d in ("runs/lab/ca/certs/me", "runs/lab/ca/certs/other", "runs/lab/conn", "runs/other-lab"):
        (t / d).mkdir(parents=True, exist_ok=True)
    for f in ("runs/lab/registry.json", "runs/lab/conn/me.jsonl"):
        (t / f).write_text("")
    os.chown(t / "runs/lab/ca/certs/me", UID, GID)
    os.chown(t / "runs/lab/conn/me.jsonl", UID, GID)
    os.chmod(t / "home/secret", 0o600)
    yield t
    shutil.rmtree(t)


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns files to uid 1337")
def test_the_interpreter_is_reached_through_a_covered_0700_directory(tree: Path) -> None:
    ops = plan_view(UID, GID, reach=[str(tree / "home/pyenv/lib/os.py")])
    assert ops == [Op(str(tree / "home"), "tmpfs"), Op(str(tree / "home/pyenv"), "bind")]  # not home/secret


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns files to uid 1337")
def test_a_hidden_state_dir_shows_only_what_is_exposed(tree: Path) -> None:
    ops = plan_view(UID, GID, hide=[str(tree / "runs")],
                    expose=[str(tree / "runs/lab/registry.json"), str(tree / "runs/lab/ca/certs/me")],
                    expose_rw=[str(tree / "runs/lab/conn/me.jsonl")])
    assert ops == [Op(str(tree / "runs"), "tmpfs"),
                   Op(str(tree / "runs/lab/registry.json"), "bind"),
                   Op(str(tree / "runs/lab/conn/me.jsonl"), "bind", writable=True),
                   Op(str(tree / "runs/lab/ca/certs/me"), "bind")]
    # an ancestor the uid cannot enter is covered too, so the exposed paths can be reached
    os.chmod(tree, 0o700)
    try:
        ops = plan_view(UID, GID, hide=[str(tree / "runs")], expose=[str(tree / "runs/lab/registry.json")])
        assert ops[0] == Op(str(tree), "tmpfs") and Op(str(tree / "runs/lab/registry.json"), "bind") in ops
    finally:
        os.chmod(tree, 0o755)


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns files to uid 1337")
def test_views_that_cannot_work_are_refused(tree: Path) -> None:
    with pytest.raises(ValueError, match="not under a hidden directory"):
        plan_view(UID, GID, expose=[str(tree / "runs/lab/registry.json")])
    with pytest.raises(ValueError, match="may not write"):  # root's file: a bind cannot make it 1337's
        plan_view(UID, GID, hide=[str(tree / "runs")], expose_rw=[str(tree / "runs/lab/registry.json")])
    with pytest.raises(ValueError, match="cannot read"):
        plan_view(UID, GID, reach=[str(tree / "home/secret")])
