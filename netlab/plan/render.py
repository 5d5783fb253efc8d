"""Human-readable rendering of a plan (``netlab plan``), grouped by namespace: each object as it
describes itself (``describe``), in the words of the tools a reader already knows."""

from __future__ import annotations

from collections import defaultdict

from netlab.plan.types import File, Netns, Plan


def render_text(plan: Plan) -> str:
    out = [f"# plan for lab {plan.lab} (topology {plan.topology}, datapath {plan.datapath}, tunnel {plan.tunnel})", ""]
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
        line = o.describe(where=False)
        if isinstance(o, File):
            host.append(line)
        else:
            by_ns[o.name if isinstance(o, Netns) else o.netns].append(line)
    for ns in [n.name for n in plan.netns]:
        out.append("")
        out.append(f"## netns {ns}")
        out.extend("   " + line for line in by_ns.get(ns, []))
    if host:
        out.append("")
        out.append("## host files")
        out.extend("   " + line for line in host)
    return "\n".join(out)
