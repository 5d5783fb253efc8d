"""Partial reads of a lab's state (issue 24): what the node agents read at start.

Each node agent of a lab read the whole plan and parsed every ledger line; they now ask for the
plan's nodes and pods only and for the ledger lines that can be a netns's. What they get must be
what the full reads give.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from netlab.kernel import ledger
from netlab.state import StateDir
from tests import sample_plans as sample


def test_partial_plan_and_cookies_match_full_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETLAB_RUN_DIR", str(tmp_path))
    plan = sample.single_node("hp-part", 5)
    sd = StateDir.of(plan.lab)
    os.makedirs(sd.path)
    sd.plan.write_text(plan.to_json())
    lines = [{"op": "intent", "key": n.key, "type": "Netns", "obj": n.__dict__, "cookie": 1000 + i}
             for i, n in enumerate(plan.netns)]
    lines += [{"op": "intent", "key": "x", "type": "Link", "obj": {"name": "Netns-lookalike"}, "cookie": 7},
              {"op": "done"}]
    sd.ledger.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"op": "intent", "type": "Netns"')
    part = ledger.read_plan(plan.lab, parts=("nodes", "pods"))
    assert plan.pods and part.pods == plan.pods and part.nodes == plan.nodes and part.lab == plan.lab
    assert part.ipt_rules == () and part.links == () and plan.links
    want = {n.name: 1000 + i for i, n in enumerate(plan.netns)}
    assert ledger.netns_cookies(plan.lab) == want  # the lookalike and the torn last line ignored
    assert len(ledger.read_entries(plan.lab)) == len(lines)
    assert len(ledger.read_entries(plan.lab, containing=b"Netns")) == len(plan.netns) + 1
