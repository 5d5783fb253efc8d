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

from netlab.errors import LabStateError
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
    some = {n.name for n in plan.netns[1:3]}
    assert ledger.netns_cookies(plan.lab, some) == {n: c for n, c in want.items() if n in some}
    assert len(ledger.read_entries(plan.lab)) == len(lines)
    assert len(ledger.read_entries(plan.lab, containing=b"Netns")) == len(plan.netns) + 1


def test_partial_plan_read_parses_only_the_members_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """plan.json as apply writes it has one top-level member per line; a read of some parts
    parses those lines only (a 1,000-pod plan: 0.3 MB of 4.6 MB), so a member it does not ask
    for is never parsed: here one that does not parse at all."""
    monkeypatch.setenv("NETLAB_RUN_DIR", str(tmp_path))
    plan = sample.single_node("hp-lines", 3)
    sd = StateDir.of(plan.lab)
    os.makedirs(sd.path)
    text = ledger.plan_json(plan)
    assert json.loads(text) == json.loads(plan.to_json())  # the same document as before
    lines = text.split("\n")
    assert len(lines) == len(json.loads(text))  # one member per line
    bad = [("\"ipt_rules\":[{not json}]," if ln.startswith('"ipt_rules"') else ln) for ln in lines]
    sd.plan.write_text("\n".join(bad))
    part = ledger.read_plan(plan.lab, parts=("nodes", "pods"))
    assert part.pods == plan.pods and part.nodes == plan.nodes and part.datapath == plan.datapath
    with pytest.raises(LabStateError):
        ledger.read_plan(plan.lab)  # the whole document: that member does not parse
    # a value that is itself an object ends its line with "}" too: only the document's "}" goes
    sd.plan.write_text(text[:-1] + ',\n"zz":{"a":{"b":1}}}')
    assert ledger.read_plan(plan.lab, parts=("pods",)).pods == plan.pods
    one = plan.pods[1]
    got = ledger.read_plan(plan.lab, parts=("pods",), where={"pods": lambda p: p.get("name") == one.name})
    assert got.pods == (one,)
