"""The plan's layout for apply (netlab.plan.layout): which namespaces are pods and which
infrastructure, what is made in which order, where each object goes. Pure: no root."""

from __future__ import annotations

from collections import Counter

import pytest

from netlab.plan.build import build_plan
from netlab.plan.layout import WORK_SECTIONS, Layout, is_early_sysctl, layout
from netlab.plan.types import Link, Netns, NodeInfo, Plan
from netlab.topology.load import available, load_topology, resolve
from tests import sample_plans


def _plan(name: str, tunnel: str = "userspace") -> Plan:
    path = resolve(name)
    return build_plan(load_topology(path), tunnel=tunnel, source=str(path))  # type: ignore[arg-type]


def _placed(lay: Layout) -> Counter[object]:
    """Every object the layout hands to apply, counted (links, netns and work)."""
    seen: Counter[object] = Counter()
    for pod in lay.pods:
        seen.update([pod.netns, *pod.inbound])
        seen.update(o for s in WORK_SECTIONS for o in getattr(pod.work, s))
    for cfg in lay.configure:
        seen.update(o for s in WORK_SECTIONS for o in getattr(cfg.work, s))
    seen.update([*lay.hubs, *lay.loose])
    seen.update(link for _, links in [*lay.hub_links, *lay.loose_links] for link in links)
    seen.update(s for group in lay.early.values() for s in group)
    return seen


@pytest.mark.parametrize("topology", [name for name, _ in available()])
@pytest.mark.parametrize("tunnel", ["userspace", "kernel"])
def test_every_object_is_placed_once(topology: str, tunnel: str) -> None:
    plan = _plan(topology, tunnel)
    lay = layout(plan)
    want = Counter([*plan.netns, *plan.links, *(o for s in WORK_SECTIONS for o in getattr(plan, s))])
    assert _placed(lay) == want


@pytest.mark.parametrize("tunnel", ["userspace", "kernel"])
def test_pods_are_the_netns_that_own_no_device(tunnel: str) -> None:
    """A pod's netns owns no device: apply makes it with its veth in one visit. The ztunnel pods
    own their tunnel devices (pistioin, pistioout) and so are infrastructure, like the nodes."""
    plan = _plan("coexistence", tunnel)
    lay = layout(plan)
    assert [p.netns.name for p in lay.pods] == [n.name for n in plan.netns if n.role == "pod" and not any(
        x.netns == n.name and x.mode == "ztunnel" for x in plan.pods)]
    ztunnels = {x.netns for x in plan.pods if x.mode == "ztunnel"}
    assert {n.name for n in lay.hubs} == {n.netns for n in plan.nodes} | ztunnels
    assert [n.role for n in lay.loose] == ["fabric"]
    for pod in lay.pods:  # one veth in, from its node, made from inside the pod
        node = plan.node(next(x.node for x in plan.pods if x.netns == pod.netns.name)).netns
        assert [(v.netns, v.kind, v.peer_netns) for v in pod.inbound] == [(node, "veth", pod.netns.name)]


def test_order_inside_a_netns_is_the_plan_order() -> None:
    plan = _plan("ambient-to-sidecar")
    lay = layout(plan)
    node = plan.nodes[0].netns
    cfg = next(c for c in lay.configure if c.netns == node)
    assert cfg.work.ipt_rules == [r for r in plan.ipt_rules if r.netns == node]
    assert cfg.work.routes == [r for r in plan.routes if r.netns == node]
    assert [c.netns for c in lay.configure] == [n.name for n in plan.netns if n.name in {c.netns for c in lay.configure}]
    assert lay.work_count() == sum(c.work.count() for c in lay.configure) > 0


def test_early_sysctls_are_the_ones_devices_copy() -> None:
    """``conf.default.*`` and ``ip_forward`` are written before the netns's devices exist."""
    plan = _plan("ambient-to-sidecar")
    lay = layout(plan)
    node = plan.nodes[0].netns
    assert {s.key_name for s in lay.early[node]} == {"net.ipv4.ip_forward", "net.ipv6.conf.default.disable_ipv6",
                                                     "net.ipv4.conf.default.rp_filter"}
    late = next(c for c in lay.configure if c.netns == node).work.sysctls
    assert "net.ipv4.conf.all.rp_filter" in {s.key_name for s in late}
    assert not any(is_early_sysctl(s.key_name) for s in late)
    assert not is_early_sysctl("net.ipv4.conf.default.rp_filter.x") and is_early_sysctl("net.ipv6.conf.default.x")


def test_far_ends_get_an_index_each() -> None:
    """Every veth end that lands in an infrastructure netns from elsewhere: a pod veth's node end,
    and both ends of the node's uplink (the kernel takes a peer's index only with the first's)."""
    plan = sample_plans.build("lx", nodes=2, pods_per_node=3)
    lay = layout(plan)
    assert len(set(lay.far_ends)) == len(lay.far_ends)
    for pod in lay.pods:
        assert all((v.netns, v.name) in lay.far_ends for v in pod.inbound)
    uplinks = [link for link in plan.links if link.netns == "lx-fabric" and link.kind == "veth"]
    assert all({(u.netns, u.name), (u.peer_netns, u.peer_name)} <= set(lay.far_ends) for u in uplinks)
    assert lay.pod_hosts == {"lx-node-1", "lx-node-2"}
    assert len(lay.far_ends) == 2 * 3 + 2 * 2


def test_a_netns_whose_veth_has_a_master_is_infrastructure() -> None:
    """A netns that owns nothing but gets a veth enslaved on the other side is not a pod."""
    plan = Plan(lab="lm", topology="t", source="", tunnel="userspace",
                nodes=(NodeInfo("n", "lm-n", "172.172.0.2", "10.0.1.0/24", "10.0.1.1"),), pods=(), services=(),
                netns=(Netns("lm-fabric", "fabric", "fabric"), Netns("lm-n", "node", "n")),
                links=(Link("lm-fabric", "br0", "bridge"),
                       Link("lm-fabric", "n", "veth", peer_netns="lm-n", peer_name="eth0", master="br0")))
    lay = layout(plan)
    assert lay.pods == [] and [n.name for n in lay.hubs] == ["lm-n"] and [n.name for n in lay.loose] == ["lm-fabric"]
    assert lay.loose_links == [("lm-fabric", list(plan.links))]
    assert [(c.netns, [dev for _, dev in c.ups]) for c in lay.configure] == [("lm-n", ["eth0"])]
