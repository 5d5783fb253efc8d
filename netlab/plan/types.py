"""The plan: every kernel object and process a lab consists of, as plain frozen values.

A plan is pure data, computed from a topology without root and without touching the kernel,
and identical for identical input (tests compare plans byte for byte). The apply stage turns
each value into exactly one kernel object and records it in the ledger under the value's
``key``; destroy undoes it from the ledger alone.

Namespace fields (``netns``) always hold the full name as it appears in ``ip netns list``.

Each object type describes itself (``describe``): one line in the words of ``ip``, ``iptables``
and ``ipset``, used by ``netlab plan``, by apply's errors and wherever else an object is named.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from netlab.plan.policy import PolicyInfo as PolicyInfo  # (re-exported: the plan's own type)

MAIN_TABLE = 254

Role = Literal["fabric", "node", "pod"]
PodMode = Literal["ambient", "sidecar", "plain", "ztunnel", "waypoint"]


def _in(netns: str, where: bool) -> str:
    return f" in netns {netns}" if where else ""


@dataclass(frozen=True)
class Netns:
    name: str
    role: Role
    ref: str  # the topology object it stands for: "fabric", "node-a", "foo/sleep"

    @property
    def key(self) -> str:
        return f"netns:{self.name}"

    def describe(self, where: bool = True) -> str:
        """``netns lab-foo-sleep (pod foo/sleep)``; ``where`` is for the objects inside one."""
        return f"netns {self.name} ({self.role}{'' if self.ref == self.role else ' ' + self.ref})"


@dataclass(frozen=True)
class Link:
    """A device created in ``netns``. For a veth, the peer is created directly in ``peer_netns``."""

    netns: str
    name: str
    kind: Literal["veth", "bridge", "tap", "geneve"]
    peer_netns: str | None = None
    peer_name: str | None = None
    master: str | None = None  # bridge to enslave to (same netns)
    vni: int | None = None  # geneve (kernel) / userspace geneve (tap)
    remote: str | None = None  # geneve remote
    mtu: int | None = None
    mac: str | None = None  # fixed MAC so plans and captures are reproducible

    @property
    def key(self) -> str:
        return f"link:{self.netns}:{self.name}"

    def describe(self, where: bool = True) -> str:
        """The device, its kind and what it connects; ``where``: and the netns it is made in."""
        if self.kind == "veth":
            s = f"veth {self.name} (peer {self.peer_name} in netns {self.peer_netns})"
        elif self.vni is not None:
            s = f"{self.kind} {self.name} id {self.vni} remote {self.remote}"
            s += " (userspace geneve)" if self.kind == "tap" else ""
        else:
            s = f"{self.kind} {self.name}"
        s += f" master {self.master}" if self.master else ""
        return s + _in(self.netns, where)


@dataclass(frozen=True)
class Address:
    netns: str
    dev: str
    ip: str
    prefixlen: int

    @property
    def key(self) -> str:
        return f"addr:{self.netns}:{self.dev}:{self.ip}/{self.prefixlen}"

    def describe(self, where: bool = True) -> str:
        return f"address {self.ip}/{self.prefixlen} on {self.dev}" + _in(self.netns, where)


@dataclass(frozen=True)
class Route:
    netns: str
    dst: str  # CIDR; "0.0.0.0/0" for default
    dev: str | None = None
    gateway: str | None = None
    table: int = MAIN_TABLE
    scope: Literal["universe", "link", "host"] = "universe"
    src: str | None = None
    onlink: bool = False
    type: Literal["unicast", "local"] = "unicast"

    @property
    def key(self) -> str:
        return f"route:{self.netns}:{self.table}:{self.type}:{self.dst}"

    def describe(self, where: bool = True) -> str:
        """``route 10.0.2.0/24 via 172.172.0.3``, in ``ip route`` order after the destination."""
        s = ("local " if self.type == "local" else "") + self.dst
        s += f" via {self.gateway}" if self.gateway else ""
        s += f" dev {self.dev}" if self.dev else ""
        s += f" table {self.table}" if self.table != MAIN_TABLE else ""
        s += f" scope {self.scope}" if self.scope != "universe" else ""
        s += f" src {self.src}" if self.src else ""
        s += " onlink" if self.onlink else ""
        return f"route {s}" + _in(self.netns, where)


@dataclass(frozen=True)
class Rule:
    """An ip rule. ``goto`` jumps to another priority (the reference's ``goto 32766``)."""

    netns: str
    priority: int
    table: int | None = None
    fwmark: int | None = None
    fwmask: int | None = None
    goto: int | None = None

    @property
    def key(self) -> str:
        return f"rule:{self.netns}:{self.priority}"

    def describe(self, where: bool = True) -> str:
        """``ip rule 101: fwmark 0x100/0x100 lookup 101``, as ``ip rule`` lists it."""
        if self.fwmark is not None:
            sel = f"fwmark {self.fwmark:#x}/{(self.fwmask if self.fwmask is not None else 0xFFFFFFFF):#x}"
        else:
            sel = "from all"
        act = f"goto {self.goto}" if self.goto is not None else f"lookup {self.table}"
        return f"ip rule {self.priority}: {sel} {act}" + _in(self.netns, where)


@dataclass(frozen=True)
class Sysctl:
    netns: str
    key_name: str  # e.g. "net.ipv4.conf.all.rp_filter"
    value: str
    #: written only if the kernel has it: a knob that exists only while a module is loaded
    #: (br_netfilter's), where "absent" already means what the plan wants
    optional: bool = False

    @property
    def key(self) -> str:
        return f"sysctl:{self.netns}:{self.key_name}"

    def describe(self, where: bool = True) -> str:
        return (f"sysctl {self.key_name}={self.value}" + (" (if the kernel has it)" if self.optional else "")
                + _in(self.netns, where))


@dataclass(frozen=True)
class IptChain:
    """A user chain, plus where it is jumped to from (inserted at position 1, as istio-cni does)."""

    netns: str
    table: Literal["filter", "nat", "mangle", "raw"]
    chain: str
    jump_from: str | None = None  # built-in chain that gets "-I <builtin> 1 -j <chain>"

    @property
    def key(self) -> str:
        return f"chain:{self.netns}:{self.table}:{self.chain}"

    def describe(self, where: bool = True) -> str:
        jump = f" (jump from {self.jump_from})" if self.jump_from else ""
        return f"iptables -t {self.table} -N {self.chain}{jump}" + _in(self.netns, where)


@dataclass(frozen=True)
class IptRule:
    """One rule in iptables-save argument form, appended to ``chain`` in plan order.

    ``spec`` is exactly what ``iptables-legacy-save`` prints after ``-A <chain> ``, e.g.
    ``-i istioin -j MARK --set-xmark 0x200/0x200``. ``ref`` says where it comes from in the
    reference (``§1.5 mangle ztunnel-PREROUTING #<n>``) so a reader can grep either way.
    """

    netns: str
    table: Literal["filter", "nat", "mangle", "raw"]
    chain: str
    spec: str
    ref: str = ""

    @property
    def key(self) -> str:
        # not unique on its own: the same text may stand twice in one chain (§1.5 #7 and #11)
        return f"ipt:{self.netns}:{self.table}:{self.chain}:{self.ref}:{self.spec}"

    def describe(self, where: bool = True) -> str:
        """The rule as ``iptables-save`` prints it, then where it comes from in the reference."""
        return (f"iptables -t {self.table} -A {self.chain} {self.spec}" + _in(self.netns, where)
                + (f" ({self.ref})" if self.ref else ""))


@dataclass(frozen=True)
class IpSet:
    netns: str
    name: str
    type: str = "hash:ip"
    comment: bool = True

    @property
    def key(self) -> str:
        return f"ipset:{self.netns}:{self.name}"

    def describe(self, where: bool = True) -> str:
        return f"ipset {self.name} ({self.type})" + _in(self.netns, where)


@dataclass(frozen=True)
class IpSetEntry:
    netns: str
    set: str
    ip: str
    comment: str | None = None

    @property
    def key(self) -> str:
        return f"ipset-entry:{self.netns}:{self.set}:{self.ip}"

    def describe(self, where: bool = True) -> str:
        return f"ipset entry {self.ip} in {self.set}" + _in(self.netns, where)


@dataclass(frozen=True)
class File:
    """A file the lab writes on the host filesystem, e.g. ``/etc/netns/<netns>/hosts``."""

    path: str
    content: str

    @property
    def key(self) -> str:
        return f"file:{self.path}"

    def describe(self, where: bool = True) -> str:
        """``file /etc/netns/<netns>/hosts (3 lines)`` (a file is on the host: no netns)."""
        return f"file {self.path} ({len(self.content.splitlines())} lines)"


@dataclass(frozen=True)
class Process:
    """A supervised program. With ``run="module"``, ``argv[0]`` is a Python module run as
    ``python -m`` and the program says it is ready with a JSON ready line; with ``run="exec"``
    (a pod's own ``command``), ``argv`` is executed as it is, and it is ready when the probe on
    ``ready_port`` (``ready_path``: HTTP) answers from one of ``ready_hosts``, or, without a
    probe, when it is still alive a moment after it started."""

    name: str  # component id used by `netlab logs`, e.g. "ztunnel-node-a"
    netns: str
    kind: Literal["ztunnel", "sidecar", "waypoint", "app", "geneve", "nodeagent", "kubelet"]
    argv: tuple[str, ...]
    uid: int = 0
    gid: int = 0
    ref: str = ""  # topology object, e.g. "bar/httpbin"
    run: Literal["module", "exec"] = "module"
    netns_etc: bool = False  # the pod's /etc/netns/<netns>/hosts as the program's /etc/hosts
    ready_port: int = 0
    ready_path: str = ""
    ready_hosts: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"proc:{self.name}"

    def describe(self, where: bool = True) -> str:
        """``process ztunnel-node-a: python -m netlab.mesh.ztunnel ...`` (user and netns too)."""
        user = f" as {self.uid}:{self.gid}" if (self.uid or self.gid) else ""
        argv = ("python -m " if self.run == "module" else "") + " ".join(self.argv)
        return f"process {self.name}{user}{_in(self.netns, where)}: {argv}"


#: Every value a plan is made of (``Plan.objects()``): the kernel objects apply creates, the
#: files it writes and the processes the runtime starts.
PlanObject = Netns | Link | Address | Route | Rule | Sysctl | IptChain | IptRule | IpSet | IpSetEntry | File | Process


# ---- inventory: what `netlab status` reports, known before anything is applied ----


@dataclass(frozen=True)
class NodeInfo:
    name: str
    netns: str
    ip: str
    pod_cidr: str
    host_ip: str  # HOST_IP of the reference: the node's address inside its pod CIDR


@dataclass(frozen=True)
class PodInfo:
    name: str
    namespace: str
    node: str
    netns: str
    ip: str
    mode: PodMode
    app: str
    service_account: str
    ports: tuple[int, ...]
    host_veth: str  # node-side veth name (the reference's ZT_VETH for a ztunnel pod)
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    namespace: str
    vip: str
    port: int
    target_port: int
    endpoints: tuple[str, ...]  # pod refs "ns/name"
    #: the waypoint pod ("ns/name") the Service is bound to with ``istio.io/use-waypoint``
    #: (datapath inpod; 1.18 binds waypoints to workloads, not Services: see the registry)
    waypoint: str = ""
    protocols: tuple[str, ...] = ("tcp",)  # what kube-proxy's DNAT carries (kube-dns: udp and tcp)


@dataclass(frozen=True)
class HopInfo:
    """One expected hop of a request path (the topology's ``paths[].hops[]``; see
    ``netlab.topology.model.Hop`` for what each field means)."""

    n: str
    at: str
    iface: str | None = None
    dir: str | None = None
    port: int | None = None
    listener: str | None = None
    rules: tuple[str, ...] = ()
    table: int | None = None
    what: str = ""
    absent: bool = False


@dataclass(frozen=True)
class PathInfo:
    """A request the topology exists to show, with its hop contract (checked by ``netlab trace``)."""

    name: str
    from_: str
    to: str
    url: str = "/"
    expect_status: int = 200
    expect_body: str | None = None
    source_seen: str = "client"
    hops: tuple[HopInfo, ...] = ()


@dataclass(frozen=True)
class Plan:
    lab: str
    topology: str  # topology name
    source: str  # path of the topology file
    tunnel: Literal["kernel", "userspace"]  # Geneve's implementation (datapath istio-1.18 only)
    nodes: tuple[NodeInfo, ...]
    pods: tuple[PodInfo, ...]
    services: tuple[ServiceInfo, ...]
    netns: tuple[Netns, ...] = ()
    links: tuple[Link, ...] = ()
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()
    rules: tuple[Rule, ...] = ()
    sysctls: tuple[Sysctl, ...] = ()
    ipsets: tuple[IpSet, ...] = ()
    ipset_entries: tuple[IpSetEntry, ...] = ()
    ipt_chains: tuple[IptChain, ...] = ()
    ipt_rules: tuple[IptRule, ...] = ()
    files: tuple[File, ...] = ()
    processes: tuple[Process, ...] = ()
    policies: tuple[PolicyInfo, ...] = ()  # not kernel objects: for the mesh's registry
    paths: tuple[PathInfo, ...] = ()  # not kernel objects: the hop contracts, for verify
    #: which datapath the lab reproduces: "istio-1.18" (node Geneve into the ztunnel pod) or
    #: "inpod" (Istio 1.30.3: rules in each enrolled pod, ztunnel's listeners inside it)
    datapath: Literal["istio-1.18", "inpod"] = "istio-1.18"
    #: inpod with DNS capture: pods resolve through the kube-dns stand-in's Service
    #: (kube-system/kube-dns) from their resolv.conf, enrolled pods through ztunnel on 15053
    dns_capture: bool = False

    # Apply order, following istio-cni's CreateRulesOnNode where it matters (§1.9): devices and
    # addresses first, then sysctls, ipsets, chains and rules, routes, ip rules, files, processes.
    SECTIONS = ("netns", "links", "addresses", "sysctls", "ipsets", "ipset_entries", "ipt_chains",
                "ipt_rules", "routes", "rules", "files", "processes")

    def objects(self) -> list[PlanObject]:
        return [o for s in self.SECTIONS for o in getattr(self, s)]

    def in_netns(self, netns: str) -> list[PlanObject]:
        return [o for o in self.objects() if getattr(o, "netns", None) == netns]

    def pod(self, ref: str) -> PodInfo:
        """Find a pod by ``ns/name`` or a unique ``name``; KeyError with a helpful message."""
        if "/" in ref:
            hits = [p for p in self.pods if p.ref == ref]
        else:
            hits = [p for p in self.pods if p.name == ref]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise KeyError(f"no pod {ref!r} in lab {self.lab!r} (pods: {', '.join(p.ref for p in self.pods)})")
        raise KeyError(f"pod name {ref!r} is ambiguous in lab {self.lab!r}: use one of {', '.join(p.ref for p in hits)}")

    def node(self, name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in lab {self.lab!r} (nodes: {', '.join(n.name for n in self.nodes)})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        types = {
            "nodes": NodeInfo, "pods": PodInfo, "services": ServiceInfo, "netns": Netns, "links": Link,
            "addresses": Address, "routes": Route, "rules": Rule, "sysctls": Sysctl, "ipsets": IpSet,
            "ipset_entries": IpSetEntry, "ipt_chains": IptChain, "ipt_rules": IptRule, "files": File,
            "processes": Process, "policies": PolicyInfo,
        }
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            v = d.get(f.name)
            if f.name == "paths":
                kw[f.name] = tuple(dataclasses.replace(_build(PathInfo, x), hops=tuple(_build(HopInfo, h) for h in x.get("hops", ())))
                                   for x in (v or ()))
            elif f.name in types:
                kw[f.name] = tuple(_build(types[f.name], x) for x in (v or ()))
            elif v is not None:
                kw[f.name] = v
        return cls(**kw)


def _build(t: type, x: dict[str, Any]) -> Any:
    kw = {}
    for f in dataclasses.fields(t):
        if f.name in x:
            v = x[f.name]
            if isinstance(v, list):
                v = tuple(tuple(i) if isinstance(i, list) else i for i in v)
            kw[f.name] = v
    return t(**kw)

