"""Topology -> Plan: a pure, deterministic function (no root, no kernel, no clock, no randomness).

Network model (ptp-CNI style, reference §1.1 and the "Reference harness" of §8):

* ``<lab>-fabric`` holds bridge ``br0``; it stands for the wire between nodes. Nothing links to
  the host's root namespace, so two labs with the same addresses never meet.
* Node i (1-based) is ``<lab>-<node>``: ``eth0`` = 172.172.0.(i+1)/16 on the fabric (the
  fabric-side end is named after the node), pod CIDR 10.0.i.0/24, IP forwarding on.
* Each pod is ``<lab>-<ns>-<pod>`` with ``eth0`` = <podIP>/32, ``<HOST_IP> dev eth0 scope link``
  and ``default via <HOST_IP>``. The node end is ``veth<8 hex>`` with HOST_IP/32 (the first
  address of the pod CIDR, shared by every pod veth, as ptp does) and a /32 host route.
* Other nodes' pod CIDRs are routed via their node IPs over the fabric.

Addresses are allocated in file order: on each node HOST_IP = .1, then the ztunnel pod, then
user pods; waypoints from the top of the node's pod CIDR down (.254, .253, ...), so a waypoint
added to a running lab or removed from the end of its list moves no other pod (`netlab waypoint`). Service VIPs come from the service CIDR starting at .10.

Two datapaths (``Plan.datapath``, the topology's ``datapath`` or ``--datapath``): ``istio-1.18``
adds the node and ztunnel-pod objects of plan/ambient.py and istio-iptables in sidecar pods;
``inpod`` adds the in-pod rules of plan/inpod.py to every enrolled pod, the probe SNAT to every
node, the CNI plugin's rules to sidecar pods, an istio-cni node agent per node, and, with DNS
capture, a kube-dns stand-in (pod and Service ``kube-system/kube-dns``, allocated after
everything else, so every other address is the same under both datapaths) and resolv.conf files.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable
from typing import Any, Literal

from netlab import istio, names
from netlab.errors import TopologyError, UsageError
from netlab.plan import addresses, ambient, inpod, sidecar
from netlab.plan.types import (
    Address,
    File,
    HopInfo,
    IptChain,
    IptRule,
    Link,
    Netns,
    NodeInfo,
    PathInfo,
    Plan,
    PodInfo,
    PolicyInfo,
    Process,
    Route,
    ServiceInfo,
    Sysctl,
)
from netlab.topology.model import Pod, Topology

Tunnel = Literal["kernel", "userspace"]
FABRIC_BRIDGE = "br0"
NODE_UPLINK = "eth0"
NODE_IPV6_OFF = "net.ipv6.conf.default.disable_ipv6"  # written before the node's devices exist
POD_IF = "eth0"
DEFAULT_APP_PORTS = {"httpbin": (80,), "helloworld": (5000,), "sink": (9000,), "echo": (9001,)}
BUILTIN_PROGRAMS = ("httpbin", "helloworld", "sink", "echo")  # apps with a program in netlab.apps
# The pod's user, for a pod's own program (``command``): nobody:nogroup, as for a container image
# whose USER is nobody. netlab runs as root and a topology file may come from anyone, so what it
# names runs with no capability and no file of root's; in exchange the pod's netns lets unprivileged
# users bind ports below 1024, as containerd 2.0 does for every pod (enable_unprivileged_ports).
POD_UID = POD_GID = 65534
KUBE_SERVICES = "KUBE-SERVICES"
NODE_AGENT = "istio-cni"  # the node agent's process is istio-cni-<node>
KUBELET = "kubelet"  # the kubelet stand-in of a node whose pods declare probes: kubelet-<node>


def resolv_conf(nameserver: str, namespace: str) -> str:
    """The ``resolv.conf`` a kubelet writes for a ClusterFirst pod of ``namespace``."""
    d = istio.CLUSTER_DOMAIN
    return f"nameserver {nameserver}\nsearch {namespace}.svc.{d} svc.{d} {d}\noptions ndots:5\n"


def veth_name(namespace: str, pod: str) -> str:
    """Node-side veth name, like Kubernetes CNIs: ``veth`` + 8 hex of a hash of the pod."""
    return "veth" + hashlib.sha256(f"{namespace}/{pod}".encode()).hexdigest()[:8]


def mac_for(*parts: str) -> str:
    """A stable locally administered unicast MAC, so captures are reproducible run to run."""
    h = hashlib.sha256("/".join(parts).encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in h[:5])


def build_plan(topo: Topology, *, lab: str | None = None, tunnel: Tunnel = "userspace", source: str = "",
               mesh: bool = True, datapath: str | None = None) -> Plan:
    """``mesh=False`` leaves out the proxies (ztunnel, sidecars, waypoints, istio-cni's node
    agents) but keeps every rule: datapath tests put their own listeners where the proxies would
    be. ``datapath`` overrides the topology's ``datapath`` key (``--datapath``)."""
    if datapath is not None and datapath != topo.datapath:
        if datapath not in istio.DATAPATHS:
            raise UsageError(f"datapath {datapath!r}: use one of {', '.join(istio.DATAPATHS)}")
        topo = topo.model_copy(update={"datapath": datapath})
    lab = topo.name if lab is None else lab  # an empty --name is an error, not the topology's name
    try:
        names.check_lab_name(lab)
    except names.BadName as e:
        raise UsageError(str(e)) from None
    b = _Builder(topo, lab, tunnel, mesh)
    try:
        b.build()
    except TopologyError as e:
        raise TopologyError(f"{source}: {e}" if source else str(e)) from None
    return Plan(
        lab=lab, topology=topo.name, source=source, tunnel=tunnel, datapath=topo.datapath,
        dns_capture=b.dns_capture, nodes=tuple(b.nodes), pods=tuple(b.pods), services=tuple(b.services),
        **{k: tuple(v) for k, v in b.objs.items()},
        policies=tuple(PolicyInfo(p.name, p.namespace, p.action, tuple(_principal(x) for x in p.from_),
                                  tuple(p.to_ports)) for p in topo.policies),
        paths=tuple(PathInfo(p.name, p.from_, p.to, p.url, p.expect_status, p.expect_body, p.source_seen,
                             tuple(HopInfo(h.n, h.at, h.iface, h.dir, h.port, h.listener, tuple(h.rules), h.table, h.what, h.absent)
                                   for h in p.hops)) for p in (x.for_datapath(topo.datapath) for x in topo.paths)),
    )


def _principal(source: str) -> str:
    """Istio writes principals without the scheme (``cluster.local/ns/foo/sa/sleep``); the plan
    carries the ``spiffe://`` form (``ns/<namespace>`` and ``*`` stay as they are)."""
    if source == "*" or source.startswith("ns/") or source.startswith("spiffe://"):
        return source
    return "spiffe://" + source


class _Builder:
    def __init__(self, topo: Topology, lab: str, tunnel: Tunnel, mesh: bool = True) -> None:
        self.t, self.lab, self.tunnel, self.mesh = topo, lab, tunnel, mesh
        self.nodes: list[NodeInfo] = []
        self.pods: list[PodInfo] = []
        self.services: list[ServiceInfo] = []
        self.objs: dict[str, list[Any]] = {s: [] for s in Plan.SECTIONS}
        self._netns_names: dict[str, str] = {}
        self._keys: dict[str, Any] = {}
        self._commands = {f"{p.namespace}/{p.name}": p for p in topo.pods if p.command is not None}
        self._topo_pods = {f"{p.namespace}/{p.name}": p for p in topo.pods}
        self.inpod = topo.datapath == istio.DATAPATH_INPOD
        # the kube-dns stand-in exists when pods resolve through DNS (inpod, DNS capture on)
        self.dns_capture = self.inpod and topo.inpod.dnsCapture and topo.has_ambient

    # ---- helpers ----
    def add(self, objs: Iterable[Any]) -> None:
        section_of = {
            "Netns": "netns", "Link": "links", "Address": "addresses", "Route": "routes", "Rule": "rules",
            "Sysctl": "sysctls", "IpSet": "ipsets", "IpSetEntry": "ipset_entries", "IptChain": "ipt_chains",
            "IptRule": "ipt_rules", "File": "files", "Process": "processes",
        }
        for o in objs:
            if isinstance(o, IptRule):  # one rule text may stand several times in a chain (§1.5 #7, #11, #14)
                self.objs["ipt_rules"].append(o)
                continue
            prev = self._keys.get(o.key)
            if prev is not None:
                if prev != o:  # two stages want different values for one kernel object: a bug here
                    raise AssertionError(f"plan conflict on {o.key}: {prev} vs {o}")
                continue  # e.g. all.rp_filter=0 wanted by both the node model and §1.8
            self._keys[o.key] = o
            self.objs[section_of[type(o).__name__]].append(o)

    def netns(self, suffix: str, role: str, ref: str) -> str:
        name = f"{self.lab}-{suffix}"
        try:  # /run/netns/<name> and /etc/netns/<name>/: validated parts make it fit; say so if not
            names.check_file_name(name, f"netns name of {ref}")
        except names.BadName as e:
            raise TopologyError(str(e)) from None
        if name in self._netns_names:
            raise TopologyError(f"netns name {name!r} would be used by both {self._netns_names[name]} and {ref}; rename one")
        self._netns_names[name] = ref
        self.add([Netns(name=name, role=role, ref=ref)])  # type: ignore[arg-type]
        return name

    # ---- stages ----
    def build(self) -> None:
        self.fabric = self.netns("fabric", "fabric", "fabric")
        self.add([Link(netns=self.fabric, name=FABRIC_BRIDGE, kind="bridge", mac=mac_for(self.lab, "br0"))])
        # The fabric is the wire between nodes, a plain switch. Where br_netfilter is loaded (Docker
        # and kubeadm hosts load it), every netns's bridges hand bridged frames to that netns's
        # iptables by default: per-netns knobs since Linux 5.3, off here; absent without the module.
        self.add([Sysctl(netns=self.fabric, key_name=f"net.bridge.bridge-nf-call-{t}", value="0", optional=True)
                  for t in ("iptables", "ip6tables", "arptables")])
        self._nodes()
        self._pods()
        self._services()
        self._node_routes()
        if self.inpod:
            self._inpod()
        else:
            self._ambient()
        self._sidecars()
        self._hosts_files()
        self._processes()

    def _nodes(self) -> None:
        nodes = self.t.nodes
        fabric = ipaddress.IPv4Network(self.t.network.fabric)
        if fabric.prefixlen > addresses.fabric_prefix_for(len(nodes)):
            raise TopologyError(f"network.fabric {fabric} is too small for {len(nodes)} nodes (at .2 to .{len(nodes) + 1}, "
                                f"below the broadcast address): use /{addresses.fabric_prefix_for(len(nodes))} or larger")
        cidrs = [ipaddress.IPv4Network(n.podCidr) if n.podCidr else ipaddress.IPv4Network(f"10.0.{i % 256}.0/24")
                 for i, n in enumerate(nodes, start=1)]
        addresses.check_disjoint([
            *((f"nodes[{i}].podCidr" + ("" if n.podCidr else " (default)"), c) for i, (n, c) in enumerate(zip(nodes, cidrs, strict=True))),
            ("network.fabric", fabric), ("network.serviceCidr", ipaddress.IPv4Network(self.t.network.serviceCidr))])
        self._pool: dict[str, addresses.AddressPool] = {}
        for i, (n, cidr) in enumerate(zip(nodes, cidrs, strict=True), start=1):
            pool = self._pool[n.name] = addresses.AddressPool(cidr)
            host_ip = pool.take()
            ip = fabric.network_address + i + 1
            ns = self.netns(n.name, "node", n.name)
            self.nodes.append(NodeInfo(name=n.name, netns=ns, ip=str(ip), pod_cidr=str(cidr), host_ip=str(host_ip)))
            self.add([
                Link(netns=self.fabric, name=n.name, kind="veth", peer_netns=ns, peer_name=NODE_UPLINK,
                     master=FABRIC_BRIDGE, mac=mac_for(self.lab, "fabric", n.name)),
                Address(netns=ns, dev=NODE_UPLINK, ip=str(ip), prefixlen=fabric.prefixlen),
                Sysctl(netns=ns, key_name="net.ipv4.ip_forward", value="1"),
                # IPv4-only, like ambient in 1.18: a node holds a veth end per pod, and every
                # IPv6 link-up walks the netns's whole IPv6 table (O(pods^2) per node) and
                # starts DAD/MLD/RS noise on the wire; see docs/deviations.md
                Sysctl(netns=ns, key_name=NODE_IPV6_OFF, value="1"),
            ])

    def _alloc(self, node: str, what: str, top: bool = False) -> str:
        a = self._pool[node].take_top() if top else self._pool[node].take()
        if a is None:
            raise TopologyError(f"node {node}: pod CIDR {self._pool[node].net} has no address left for {what}")
        return str(a)

    def _pod(self, *, name: str, namespace: str, node: str, mode: str, app: str, sa: str,
             ports: tuple[int, ...], labels: dict[str, str]) -> PodInfo:
        ni = self._node(node)
        ip = self._alloc(node, f"{namespace}/{name}", top=mode == "waypoint")
        ns = self.netns(f"{namespace}-{name}", "pod", f"{namespace}/{name}")
        veth = veth_name(namespace, name)
        pod = PodInfo(name=name, namespace=namespace, node=node, netns=ns, ip=ip, mode=mode,  # type: ignore[arg-type]
                      app=app, service_account=sa, ports=ports, host_veth=veth,
                      labels=tuple(sorted(labels.items())))
        self.pods.append(pod)
        self.add([
            Link(netns=ni.netns, name=veth, kind="veth", peer_netns=ns, peer_name=POD_IF,
                 mac=mac_for(self.lab, node, veth)),
            Address(netns=ni.netns, dev=veth, ip=ni.host_ip, prefixlen=32),
            Route(netns=ni.netns, dst=f"{ip}/32", dev=veth, scope="link"),
            Address(netns=ns, dev=POD_IF, ip=ip, prefixlen=32),
            Route(netns=ns, dst=f"{ni.host_ip}/32", dev=POD_IF, scope="link"),
            Route(netns=ns, dst="0.0.0.0/0", gateway=ni.host_ip, dev=POD_IF),
        ])
        return pod

    def _node(self, name: str) -> NodeInfo:
        return next(n for n in self.nodes if n.name == name)

    def _pods(self) -> None:
        t = self.t
        if t.has_ambient:
            for n in t.nodes:  # a DaemonSet: one ztunnel per node, HELM: uid 0 / gid 1337
                self._pod(name=f"ztunnel-{n.name}", namespace=istio.ISTIO_SYSTEM_NS, node=n.name, mode="ztunnel",
                          app="ztunnel", sa=istio.ZTUNNEL_SA, ports=(), labels={"app": "ztunnel"})
        for w in t.waypoints:
            labels = {"gateway.istio.io/managed": "istio.io-mesh-controller"}
            if w.serviceAccount:  # annotation istio.io/for-service-account on the Gateway (§7)
                labels[istio.LABEL_FOR_SERVICE_ACCOUNT] = w.serviceAccount
            self._pod(name=w.name, namespace=w.namespace, node=w.node, mode="waypoint", app="waypoint",
                      sa=f"{w.name}-istio-waypoint", ports=(istio.HBONE_PORT,), labels=labels)
        for p in t.pods:
            ports = tuple(p.ports) or DEFAULT_APP_PORTS.get(p.app_name, ())
            mode = t.mode_of_pod(p)
            labels = {"app": p.app_name, "version": p.version}
            if self.inpod and mode == "sidecar" and t.inpod.sidecarTunnel == istio.TUNNEL_HTTP:
                # the ambient profile's injector (ISTIO_META_ENABLE_HBONE, inpod §4.2), unless the pod says otherwise
                labels[istio.LABEL_TUNNEL] = istio.TUNNEL_HTTP
            labels.update(p.labels)
            self._pod(name=p.name, namespace=p.namespace, node=p.node, mode=mode, app=p.app_name,
                      sa=p.sa, ports=ports, labels=labels)
        if self.dns_capture:  # last, so no other address moves between the two datapaths
            self._pod(name=istio.KUBE_DNS_NAME, namespace=istio.KUBE_SYSTEM_NS, node=t.nodes[0].name, mode="plain",
                      app=istio.KUBE_DNS_NAME, sa=istio.KUBE_DNS_NAME, ports=(istio.DNS_PORT,),
                      labels={"k8s-app": istio.KUBE_DNS_NAME})

    def _services(self) -> None:
        svc_cidr = ipaddress.IPv4Network(self.t.network.serviceCidr)
        taken = frozenset(ipaddress.IPv4Address(s.clusterIP) for s in self.t.services if s.clusterIP)
        vips = addresses.AddressPool(svc_cidr, first=10, taken=taken)  # automatic VIPs start at .10, like the lab's docs say
        seen: dict[tuple[str, int], str] = {}
        for i, s in enumerate(self.t.services):
            vip = s.clusterIP
            if vip is not None:
                a = ipaddress.IPv4Address(vip)
                if a not in svc_cidr or a in (svc_cidr.network_address, svc_cidr.broadcast_address):
                    raise TopologyError(f"services[{i}].clusterIP: {vip} is not a usable address of network.serviceCidr {svc_cidr}")
            if vip is None:
                auto = vips.take()
                if auto is None:
                    raise TopologyError(f"services[{i}] ({s.namespace}/{s.name}): network.serviceCidr {svc_cidr} "
                                        "has no address left for a VIP")
                vip = str(auto)
            if (vip, s.port) in seen:
                raise TopologyError(f"services[{i}] ({s.namespace}/{s.name}): {vip}:{s.port} is already used by {seen[vip, s.port]}")
            seen[vip, s.port] = f"{s.namespace}/{s.name}"
            eps = tuple(p.ref for p in self.pods
                        if p.namespace == s.namespace and s.selector and all(dict(p.labels).get(k) == v for k, v in s.selector.items()))
            self.services.append(ServiceInfo(name=s.name, namespace=s.namespace, vip=vip, port=s.port,
                                             target_port=s.targetPort or s.port, endpoints=eps,
                                             waypoint=self._use_waypoint(i, s.namespace, s.labels) if self.inpod else ""))
        if self.dns_capture:
            auto = vips.take()
            if auto is None:
                raise TopologyError(f"network.serviceCidr {svc_cidr} has no address left for the kube-dns Service "
                                    "(datapath inpod with DNS capture)")
            dns_ref = f"{istio.KUBE_SYSTEM_NS}/{istio.KUBE_DNS_NAME}"
            self.services.append(ServiceInfo(name=istio.KUBE_DNS_NAME, namespace=istio.KUBE_SYSTEM_NS, vip=str(auto),
                                             port=istio.DNS_PORT, target_port=istio.DNS_PORT, endpoints=(dns_ref,),
                                             protocols=("udp", "tcp")))

    def _use_waypoint(self, i: int, namespace: str, labels: dict[str, str]) -> str:
        """Inpod §3.6: the waypoint a Service is bound to, as ``ns/name``, or "". The Service's
        label ``istio.io/use-waypoint`` beats its namespace's, ``none`` opts out. A topology's
        ``waypoints:`` entry of namespace N stands for ``istioctl waypoint apply
        --enroll-namespace``: it labels namespace N with its name, unless N has the label already."""
        ns_labels = self.t.namespaces[namespace].labels
        name = labels.get(istio.LABEL_USE_WAYPOINT) or ns_labels.get(istio.LABEL_USE_WAYPOINT)
        if name is None:
            enrolled = [w for w in self.t.waypoints if w.namespace == namespace]
            name = enrolled[0].name if enrolled else None
        if name is None or name == istio.DATAPLANE_MODE_NONE:
            return ""
        if not any(w.namespace == namespace and w.name == name for w in self.t.waypoints):
            raise TopologyError(f"services[{i}] ({namespace}): {istio.LABEL_USE_WAYPOINT} names waypoint {name!r}, "
                                f"which is not in waypoints (of namespace {namespace})")
        return f"{namespace}/{name}"

    def _node_routes(self) -> None:
        for n in self.nodes:
            for other in self.nodes:
                if other.name != n.name:
                    self.add([Route(netns=n.netns, dst=other.pod_cidr, gateway=other.ip, dev=NODE_UPLINK)])
            self.add([Sysctl(netns=n.netns, key_name="net.ipv4.conf.all.rp_filter", value="0")])
        # kube-proxy's service DNAT for traffic that no mesh proxy handles (plain pods; ambient pods'
        # packets are marked 0x100 and ACCEPTed in ztunnel-PREROUTING first, so they reach ztunnel un-DNATed).
        if not self.services:
            return
        for n in self.nodes:
            self.add([IptChain(netns=n.netns, table="nat", chain=KUBE_SERVICES, jump_from="PREROUTING"),
                      IptRule(netns=n.netns, table="nat", chain="OUTPUT", spec=f"-j {KUBE_SERVICES}", ref="kube-proxy")])
            for s in self.services:
                eps = [self._pod_by_ref(r) for r in s.endpoints]
                if not eps:
                    continue
                for proto in s.protocols:
                    for k, ep in enumerate(eps):
                        left = len(eps) - k
                        stat = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
                        self.add([IptRule(netns=n.netns, table="nat", chain=KUBE_SERVICES,
                                          spec=f"-d {s.vip}/32 -p {proto} -m {proto} --dport {s.port} {stat}"
                                               f"-j DNAT --to-destination {ep.ip}:{s.target_port}",
                                          ref=f"kube-proxy {s.namespace}/{s.name}")])

    def _pod_by_ref(self, ref: str) -> PodInfo:
        return next(p for p in self.pods if p.ref == ref)

    def _ambient(self) -> None:
        if not self.t.has_ambient:
            return
        for n in self.nodes:
            zt = next(p for p in self.pods if p.mode == "ztunnel" and p.node == n.name)
            enrolled = [p for p in self.pods if p.node == n.name and ambient.is_enrolled(p)]
            self.add(ambient.node_objects(n.netns, n.name, n.host_ip, zt, enrolled, self.tunnel))
            self.add(ambient.ztunnel_objects(zt.netns, n.name, zt, n.host_ip, self.tunnel))

    def _inpod(self) -> None:
        """Inpod §1-§2: each enrolled pod's rules (its annotations pick the §1.8 variants) and each
        node's probe SNAT; nothing on the nodes or in the ztunnel pods beyond that (§2.2)."""
        if not self.t.has_ambient:
            return
        for n in self.nodes:
            enrolled = [p for p in self.pods if p.node == n.name and inpod.is_enrolled(p)]
            self.add(inpod.node_objects(n.netns, n.name, enrolled))
        for p in self.pods:
            if inpod.is_enrolled(p):
                notes = self._topo_pods[p.ref].annotations
                self.add(inpod.pod_objects(
                    p, dns_capture=inpod.annotation_flag(notes, istio.ANNOTATION_DNS_CAPTURE, self.t.inpod.dnsCapture),
                    bypass_inbound=inpod.annotation_flag(notes, istio.ANNOTATION_BYPASS_INBOUND_CAPTURE, False)))

    def _sidecars(self) -> None:
        for p in self.pods:
            if p.mode == "sidecar":  # istio-cni's plugin under inpod (§4.2), istio-iptables in 1.18 (§6)
                self.add(sidecar.cni_plugin_objects(p.netns) if self.inpod else sidecar.sidecar_objects(p.netns))

    def _hosts_files(self) -> None:
        """``ip netns exec`` bind-mounts /etc/netns/<netns>/hosts over /etc/hosts: DNS for the lab.

        With DNS capture (inpod) the hosts file names the pod only, and ``resolv.conf`` points at
        the kube-dns Service with the search list a kubelet writes (``ndots:5``)."""
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        if not self.dns_capture:
            for s in self.services:
                lines.append(f"{s.vip}\t{s.name}.{s.namespace} {s.name}.{s.namespace}.svc {s.name}.{s.namespace}.svc.cluster.local")
        dns = next((s for s in self.services if s.name == istio.KUBE_DNS_NAME and s.namespace == istio.KUBE_SYSTEM_NS),
                   None) if self.dns_capture else None
        for p in self.pods:
            if p.mode in ("ztunnel", "waypoint"):
                continue
            own = [] if dns else [f"{s.vip}\t{s.name}" for s in self.services if s.namespace == p.namespace]
            body = "\n".join(lines + own + [f"{p.ip}\t{p.name}"]) + "\n"
            self.add([File(path=f"/etc/netns/{p.netns}/hosts", content=body)])
            if dns is not None:
                self.add([File(path=f"/etc/netns/{p.netns}/resolv.conf", content=resolv_conf(dns.vip, p.namespace))])

    def _kubelets(self) -> None:
        """One kubelet stand-in per node that has a pod with ``probes`` (netlab.mesh.kubelet), in
        the node's netns as a kubelet is; each probe on its argv, so it needs no plan."""
        for n in self.nodes:
            probes = []
            for p in self.pods:
                spec = self._topo_pods.get(p.ref)
                if p.node != n.name or spec is None or spec.probes is None:
                    continue
                for kind in ("readiness", "liveness"):
                    pr = getattr(spec.probes, kind)
                    if pr is not None:
                        probes.append({"kind": kind, "pod": p.ref, "ip": p.ip, **pr.model_dump()})
            if probes:
                self.add([Process(name=f"{KUBELET}-{n.name}", netns=n.netns, kind="kubelet", ref=n.name,
                                  argv=("netlab.mesh.kubelet", "--lab", self.lab, "--node", n.name,
                                        "--probes", json.dumps(probes, separators=(",", ":"))))])

    def _processes(self) -> None:
        self._kubelets()
        if self.mesh and self.inpod and self.t.has_ambient:
            for n in self.nodes:  # istio-cni's node agent (a DaemonSet): hands pod netns to the node's ztunnel
                self.add([Process(name=f"{NODE_AGENT}-{n.name}", netns=n.netns, kind="nodeagent", ref=n.name,
                                  argv=("netlab.mesh.nodeagent", "--lab", self.lab, "--node", n.name))])
        for p in self.pods:
            if self.mesh and p.mode == "ztunnel":
                self.add([Process(name=f"ztunnel-{p.node}", netns=p.netns, kind="ztunnel", ref=p.ref,
                                  argv=("netlab.mesh.ztunnel", "--lab", self.lab, "--node", p.node))])
            elif self.mesh and p.mode == "waypoint":
                self.add([Process(name=f"{p.name}.{p.namespace}", netns=p.netns, kind="waypoint", ref=p.ref,
                                  argv=("netlab.mesh.waypoint", "--lab", self.lab, "--pod", p.ref))])
            if self.mesh and p.mode == "sidecar":  # istio-proxy runs as 1337:1337 (§6 -u 1337)
                self.add([Process(name=f"{p.name}.{p.namespace}-sidecar", netns=p.netns, kind="sidecar", ref=p.ref,
                                  argv=("netlab.mesh.sidecar", "--lab", self.lab, "--pod", p.ref),
                                  uid=istio.PROXY_UID, gid=istio.PROXY_GID)])
            own = self._commands.get(p.ref)
            if own is not None:
                self.add([self._own_program(p, own)])
            elif p.app == istio.KUBE_DNS_NAME and p.namespace == istio.KUBE_SYSTEM_NS:
                if not self.mesh:  # it answers from the mesh's registry, which mesh=False never writes
                    continue
                self.add([Process(name=f"{p.name}.{p.namespace}", netns=p.netns, kind="app", ref=p.ref,
                                  argv=("netlab.mesh.kubedns", "--lab", self.lab))])
            elif p.app in BUILTIN_PROGRAMS and p.mode not in ("ztunnel", "waypoint"):
                argv: list[str] = [f"netlab.apps.{p.app}", "--name", p.name]
                for port in p.ports:
                    argv += ["--port", str(port)]
                self.add([Process(name=f"{p.name}.{p.namespace}", netns=p.netns, kind="app", argv=tuple(argv), ref=p.ref)])

    def _own_program(self, p: PodInfo, pod: Pod) -> Process:
        """A pod's ``command``: run as it is, as the pod's user, with the pod's /etc/hosts, and
        ready when its readiness probe answers (see Process)."""
        self.add([Sysctl(netns=p.netns, key_name="net.ipv4.ip_unprivileged_port_start", value="0")])
        r = pod.readiness
        return Process(name=f"{p.name}.{p.namespace}", netns=p.netns, kind="app", argv=tuple(pod.command or ()),
                       uid=POD_UID, gid=POD_GID, ref=p.ref, run="exec", netns_etc=True,
                       ready_port=r.port if r else 0, ready_path=(r.path or "") if r else "",
                       ready_hosts=("127.0.0.1", p.ip) if r else ())
