"""Human-readable rendering of a plan, grouped by namespace, in commands a reader already knows."""

from __future__ import annotations

from collections import defaultdict

from netlab.plan.types import (Address, File, IpSet, IpSetEntry, IptChain, IptRule, Link, Netns, Plan, Process,
                               Route, Rule, Sysctl)


def render_object(o: object) -> str:
    """One line per object, in `ip`/`iptables-save`/`ipset` spelling."""
    if isinstance(o, Netns):
        return f"ip netns add {o.name}    # {o.role} {o.ref}"
    if isinstance(o, Link):
        s = f"ip link add {o.name} type {o.kind}"
        if o.kind == "veth":
            s += f" peer name {o.peer_name} netns {o.peer_netns}"
        if o.vni is not None:
            s += f" id {o.vni} remote {o.remote}"
            if o.kind == "tap":
                s += "   # userspace geneve over TAP"
        if o.master:
            s += f" master {o.master}"
        return s
    if isinstance(o, Address):
        return f"ip addr add {o.ip}/{o.prefixlen} dev {o.dev}"
    if isinstance(o, Route):
        s = "ip route add " + ("local " if o.type == "local" else "") + ("default" if o.dst == "0.0.0.0/0" else o.dst)
        if o.gateway:
            s += f" via {o.gateway}"
        if o.dev:
            s += f" dev {o.dev}"
        if o.src:
            s += f" src {o.src}"
        if o.scope != "universe":
            s += f" scope {o.scope}"
        if o.onlink:
            s += " onlink"
        if o.table != 254:
            s += f" table {o.table}"
        return s
    if isinstance(o, Rule):
        s = f"ip rule add priority {o.priority}"
        if o.fwmark is not None:
            s += f" fwmark {o.fwmark:#x}/{(o.fwmask if o.fwmask is not None else 0xffffffff):#x}"
        s += f" goto {o.goto}" if o.goto is not None else f" lookup {o.table}"
        return s
    if isinstance(o, Sysctl):
        return f"sysctl -w {o.key_name}={o.value}" + ("  (if the kernel has it)" if o.optional else "")
    if isinstance(o, IpSet):
        return f"ipset create {o.name} {o.type}" + (" comment" if o.comment else "")
    if isinstance(o, IpSetEntry):
        return f"ipset add {o.set} {o.ip}" + (f" comment {o.comment}" if o.comment else "")
    if isinstance(o, IptChain):
        s = f"iptables -t {o.table} -N {o.chain}"
        if o.jump_from:
            s += f" && iptables -t {o.table} -I {o.jump_from} 1 -j {o.chain}"
        return s
    if isinstance(o, IptRule):
        return f"iptables -t {o.table} -A {o.chain} {o.spec}" + (f"   # {o.ref}" if o.ref else "")
    if isinstance(o, File):
        return f"write {o.path} ({len(o.content.splitlines())} lines)"
    if isinstance(o, Process):
        user = f" as {o.uid}:{o.gid}" if (o.uid or o.gid) else ""
        return f"run {o.name}{user}: python -m {' '.join(o.argv)}"
    return repr(o)


def render_text(plan: Plan) -> str:
    out = [f"# plan for lab {plan.lab} (topology {plan.topology}, tunnel {plan.tunnel})", ""]
    out.append("# nodes")
    for n in plan.nodes:
        out.append(f"#   {n.name:<12} netns {n.netns:<32} ip {n.ip:<14} pod CIDR {n.pod_cidr} (HOST_IP {n.host_ip})")
    out.append("# pods")
    for p in plan.pods:
        out.append(f"#   {p.ref:<28} {p.mode:<9} node {p.node:<10} ip {p.ip:<12} veth {p.host_veth}  netns {p.netns}")
    if plan.services:
        out.append("# services")
        for s in plan.services:
            out.append(f"#   {s.namespace}/{s.name:<22} {s.vip}:{s.port} -> {s.target_port}  endpoints {', '.join(s.endpoints) or '-'}")
    if plan.policies:
        out.append("# policies (L4, enforced by the destination's ztunnel)")
        for pol in plan.policies:
            ports = ",".join(map(str, pol.ports)) or "any port"
            out.append(f"#   {pol.namespace}/{pol.name:<22} {pol.action:<5} from {', '.join(pol.sources) or 'any source'}"
                       f" to {ports}")
    by_ns: dict[str, list[str]] = defaultdict(list)
    host: list[str] = []
    for o in plan.objects():
        ns = getattr(o, "netns", None)
        if isinstance(o, Netns):
            ns = o.name
        (by_ns[ns] if ns else host).append(render_object(o))
    for ns in [n.name for n in plan.netns]:
        out.append("")
        out.append(f"## netns {ns}")
        out.extend("   " + line for line in by_ns.get(ns, []))
    if host:
        out.append("")
        out.append("## host files")
        out.extend("   " + line for line in host)
    return "\n".join(out)
