"""A live label change as a plan delta (netlab.plan.relabel) and the registry the proxies follow
(Registry.refresh): pure, no root.

The delta of an enrolment is exactly what the plan builders make for an enrolled pod (1.18: the
§3 objects of plan/ambient.enrollment_objects; inpod: plan/inpod.pod_objects plus the probe
ipset entry), its reverse removes the same minus the sysctl istio-cni does not undo; what a label
cannot do live is refused with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from netlab.errors import UsageError
from netlab.mesh.registry import Registry, build_registry
from netlab.plan import ambient, inpod
from netlab.plan.build import build_plan
from netlab.plan.relabel import LabelChange, add_override, parse_change, plan_delta, with_overrides
from netlab.plan.types import IpSetEntry, Plan, Sysctl
from netlab.topology.load import load_topology

ENROL = LabelChange("namespace/legacy", "istio.io/dataplane-mode", "ambient")


def plans(topology: str, change: LabelChange, datapath: str | None = None) -> tuple[Plan, Plan]:
    topo = load_topology(topology)
    old = build_plan(topo, lab="t", datapath=datapath)
    new = build_plan(with_overrides(topo, add_override({}, change)), lab="t", datapath=datapath)
    return old, new


def test_parse_change_takes_kubectl_spelling_and_refuses_the_rest() -> None:
    assert parse_change("namespace/foo", "istio.io/dataplane-mode=ambient") == \
        LabelChange("namespace/foo", "istio.io/dataplane-mode", "ambient")
    assert parse_change("pod/foo/sleep", "istio.io/dataplane-mode-").value is None
    for target, assignment, words in [("ns/foo", "istio.io/dataplane-mode=ambient", "namespace/NS or pod/NS/NAME"),
                                      ("pod/foo", "istio.io/dataplane-mode=ambient", "namespace/NS or pod/NS/NAME"),
                                      ("namespace/Foo", "istio.io/dataplane-mode=ambient", "target"),
                                      ("namespace/foo", "istio.io/dataplane-mode", "KEY=VALUE"),
                                      ("namespace/foo", "istio-injection=enabled", "acts on live"),
                                      ("namespace/foo", "istio.io/dataplane-mode=Amb ient", "value")]:
        with pytest.raises(UsageError, match=words):
            parse_change(target, assignment)


def test_1_18_enrolment_is_the_section_3_objects_and_unenrolment_keeps_the_sysctl() -> None:
    old, new = plans("plain-to-ambient", ENROL)
    d = plan_delta(old, new)
    sleep = new.pod("legacy/sleep")
    node = new.node("node-a")
    assert d.modes == {"legacy/sleep": ("plain", "ambient")}
    assert set(d.added) == set(ambient.enrollment_objects(node.netns, node.host_ip, sleep)) and not d.removed
    back = plan_delta(new, old)
    assert set(back.removed) == {o for o in d.added if not isinstance(o, Sysctl)} and not back.added


def test_inpod_enrolment_is_the_pods_rules_and_its_probe_ipset_entry() -> None:
    old, new = plans("plain-to-ambient", ENROL, datapath="inpod")
    d = plan_delta(old, new)
    sleep = new.pod("legacy/sleep")
    want = inpod.pod_objects(sleep)
    mine = [o for o in d.added if o.netns == sleep.netns]
    assert len(mine) == len(want) and set(mine) == set(want)  # (kernel/live.py applies them in §1.2 order)
    entries = [o for o in d.added if isinstance(o, IpSetEntry)]
    assert [(e.netns, e.set, e.ip) for e in entries] == [(new.node("node-a").netns, "istio-inpod-probes-v4", sleep.ip)]
    back = plan_delta(new, old)
    assert set(back.removed) == set(d.added) and not back.added


def test_changes_that_need_a_restart_or_an_install_are_refused() -> None:
    # a lab with no ambient pod has no ztunnel: enrolling would need ztunnel pods (namespaces, processes)
    topo = load_topology("two-nodes")
    ns = next(iter(topo.namespaces))
    old = build_plan(topo, lab="t")
    new = build_plan(with_overrides(topo, {f"namespace/{ns}": {"istio.io/dataplane-mode": "ambient"}}), lab="t")
    with pytest.raises(UsageError, match="needs more than istio-cni does live"):
        plan_delta(old, new)
    with pytest.raises(UsageError, match="no namespace 'nope'"):
        with_overrides(topo, {"namespace/nope": {"istio.io/dataplane-mode": "ambient"}})


def test_registry_follows_its_file_rewritten_in_place(tmp_path: Path) -> None:
    old, new = plans("plain-to-ambient", ENROL)
    f = tmp_path / "registry.json"
    f.write_text(build_registry(old).to_json())
    reg = Registry.load(f)
    ip = old.pod("legacy/sleep").ip
    assert reg.workload(ip) is not None and reg.workload(ip).mode == "plain"  # type: ignore[union-attr]
    ino = f.stat().st_ino
    build_registry(new).write_in_place(f)
    assert f.stat().st_ino == ino  # a sidecar's bind mount of the file still shows it
    w = reg.workload(ip)
    assert w is not None and (w.mode, w.protocol) == ("ambient", "HBONE")
    text = build_registry(old).to_json()
    f.write_text(text[: len(text) // 2])  # a writer caught half-way: the old view stays
    w = reg.workload(ip)
    assert w is not None and w.mode == "ambient"
    f.write_text(text)
    w = reg.workload(ip)
    assert w is not None and w.mode == "plain"
