"""Connection logs (issue 17, items 1, 9, 12c): files made by the lab, never followed through a
symlink nor created by a writer, bounded in size, and readers that skip what is not a leg."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from netlab.mesh.connlog import ConnLog, Leg, LegFollower, files_of, prepare, read_legs, read_legs_counted

ME = (os.geteuid(), os.getegid())


def leg(i: int) -> Leg:
    return Leg(component="ztunnel-node-a", listener="outbound:15001", src=f"10.0.1.3:{10000 + i}",
               orig_dst="10.96.0.10:8000", up_src=f"10.0.1.3:{20000 + i}", up_dst="10.0.2.3:80", start=1000.0 + i)


def test_the_writer_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    log = tmp_path / "ztunnel-node-a.jsonl"
    log.symlink_to(secret)
    with pytest.raises(OSError):
        ConnLog(log).write(leg(1))
    assert secret.read_text() == "root only\n"
    with pytest.raises(OSError):  # and the lab does not adopt it either
        prepare(log, *ME)
    assert secret.read_text() == "root only\n" and log.is_symlink()


def test_the_writer_creates_nothing(tmp_path: Path) -> None:
    """A writer opens the files ``up`` made (without O_CREAT): a missing one is an error."""
    with pytest.raises(FileNotFoundError, match="not prepared"):
        ConnLog(tmp_path / "x.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_prepare_refuses_a_hard_link_to_another_file(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text("x\n")
    os.link(other, tmp_path / "c.jsonl")
    with pytest.raises(OSError, match="not a plain file"):
        prepare(tmp_path / "c.jsonl", *ME)


def test_logs_alternate_between_two_bounded_files_and_readers_read_both(tmp_path: Path) -> None:
    path = tmp_path / "ztunnel-node-a.jsonl"
    prepare(path, *ME)
    cap = 4096
    w = ConnLog(path, max_bytes=cap)
    line = len(json.dumps(leg(0).__dict__)) + 40  # about one line
    follower = LegFollower({"ztunnel-node-a": path})
    seen = []
    for i in range(500):
        w.write(leg(i))
        if i % 7 == 0:
            seen += follower.poll()
        assert all(f.stat().st_size <= cap for f in files_of(path))
    seen += follower.poll()
    w.close()
    legs = read_legs(path)
    assert cap // line <= len(legs) <= 2 * cap // line + 2, len(legs)
    idx = [int(g["src"].rsplit(":", 1)[1]) - 10000 for g in legs]
    assert idx == list(range(500 - len(legs), 500))  # the newest, oldest first, none twice
    # the follower saw every leg exactly once while the writer switched files under it
    assert [int(g["src"].rsplit(":", 1)[1]) - 10000 for g in seen] == list(range(500))
    # a restarted writer goes on in the newer file
    w2 = ConnLog(path, max_bytes=cap)
    w2.write(leg(500))
    w2.close()
    assert [int(g["src"].rsplit(":", 1)[1]) - 10000 for g in read_legs(path)][-2:] == [499, 500]


def test_readers_skip_and_count_lines_that_are_not_legs(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    prepare(path, *ME)
    w = ConnLog(path)
    w.write(leg(1))
    with open(path, "a") as f:
        f.write('{not json\n[1, 2]\n"text"\n{"src": 1}\n'
                '{"component": "x", "listener": "l", "src": "a", "orig_dst": "b", "start": "yesterday"}\n'
                + "[" * 5000 + "\n\n")
    w.write(leg(2))
    w.close()
    legs, skipped = read_legs_counted(path)
    assert [g["src"] for g in legs] == ["10.0.1.3:10001", "10.0.1.3:10002"] and skipped == 6
    follower = LegFollower({"s": path})
    with open(path, "a") as f:
        f.write("garbage\n")
    assert follower.poll() == [] and follower.skipped == 1
