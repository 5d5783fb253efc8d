"""The workload and service registry: what istiod would push to ztunnel (WDS) and Envoy (EDS).

Derived from the plan alone, so every proxy of a lab sees the same, deterministic view. Written to
the lab's state directory at ``up`` and loaded by ztunnel, sidecars and waypoints: it is all a
proxy knows of the lab (a workload carries its pod's labels too, for the sidecar's ``version``
baggage and a waypoint's service-account scope), so no proxy reads the plan.

Protocol per workload (reference §3, §5.2, AIDX): ambient-enrolled pods and waypoints speak HBONE;
a sidecar pod labelled ``networking.istio.io/tunnel=http`` speaks HBONE natively (``native_hbone``);
every other pod gets plain TCP.

The registry says which release istiod is (``datapath``), since that decides what it pushes: 1.18
binds a waypoint to the *workloads* of its namespace (or service account), so every caller's
traffic to them goes through it; the in-pod release binds it to *Services* (``istio.io/use-waypoint``,
``waypoint-for: service``): ``ServiceEntry.waypoint``, and only VIP traffic of ztunnel clients
goes there (inpod reference §3.4, §3.6, §4.4).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from netlab import istio
from netlab.plan.policy import PolicyInfo as Policy  # the plan's policies are what istiod would push

if TYPE_CHECKING:  # (at run time only build_registry needs the plan, and imports it: see plan.policy)
    from netlab.plan.types import Plan, PodInfo

__all__ = ["Policy", "Protocol", "Registry", "ServiceEntry", "Workload", "build_registry"]

Protocol = Literal["HBONE", "TCP"]


@dataclass(frozen=True)
class Workload:
    name: str
    namespace: str
    ip: str
    node: str
    service_account: str
    identity: str
    protocol: Protocol
    mode: str
    native_hbone: bool = False
    waypoints: tuple[str, ...] = ()  # waypoint pod IPs (§7 "Waypoint addresses")
    app: str = ""
    labels: tuple[tuple[str, str], ...] = ()  # the pod's labels, as in the plan
    uid: str = ""  # the pod UID (ZDS AddWorkload.uid; the probe ipset's comment)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def label(self, key: str) -> str | None:
        return next((v for k, v in self.labels if k == key), None)


@dataclass(frozen=True)
class ServiceEntry:
    name: str
    namespace: str
    vip: str
    port: int
    target_port: int
    endpoints: tuple[str, ...]  # endpoint pod IPs
    waypoint: str = ""  # inpod: the waypoint pod IP of the Service's istio.io/use-waypoint binding

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{istio.CLUSTER_DOMAIN}"


@dataclass
class Registry:
    trust_domain: str
    datapath: str = istio.DATAPATH_1_18
    workloads: dict[str, Workload] = field(default_factory=dict)  # by IP
    services: dict[str, ServiceEntry] = field(default_factory=dict)  # by "vip:port"
    ztunnels: dict[str, str] = field(default_factory=dict)  # node -> ztunnel pod IP
    policies: list[Policy] = field(default_factory=list)  # in topology order
    # where it was loaded from, and that file's (ino, size, mtime_ns) when it was: istiod pushes
    # changes (a live `netlab label`), so every lookup first sees whether the file changed
    source: Path | None = field(default=None, repr=False, compare=False)
    _stamp: tuple[int, int, int] | None = field(default=None, repr=False, compare=False)

    # ---- lookups the proxies make ----
    def workload(self, ip: str) -> Workload | None:
        self.refresh()
        return self.workloads.get(ip)

    def pod(self, ref: str) -> Workload | None:
        """The workload of pod ``<namespace>/<name>`` (how a sidecar or waypoint finds itself)."""
        self.refresh()
        return next((w for w in self.workloads.values() if w.ref == ref), None)

    def service(self, ip: str, port: int) -> ServiceEntry | None:
        self.refresh()
        return self.services.get(f"{ip}:{port}")

    def refresh(self) -> bool:
        """Take the file's content if it changed since it was read (one ``stat`` when it did
        not: the proxies call this per connection). The writer rewrites it in place (a sidecar
        sees the file through a bind mount, which a rename would leave behind), so a read that
        does not parse, or is shorter than the file, is a write in progress: keep the old view
        and look again next time. True if the view changed."""
        if self.source is None:
            return False
        try:
            st = os.stat(self.source)
        except OSError:
            return False
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return False
        try:
            data = self.source.read_bytes()
            fresh = Registry.from_json(data.decode())
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if len(data) != st.st_size:
            return False
        self.trust_domain, self.datapath = fresh.trust_domain, fresh.datapath
        self.workloads.clear()
        self.workloads.update(fresh.workloads)
        self.services.clear()
        self.services.update(fresh.services)
        self.ztunnels.clear()
        self.ztunnels.update(fresh.ztunnels)
        self.policies[:] = fresh.policies
        self._stamp = stamp
        return True

    def write_in_place(self, path: str | os.PathLike[str]) -> None:
        """istiod's push: the file rewritten with the same inode (see :meth:`refresh`)."""
        data = self.to_json().encode()
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, data)
        finally:
            os.close(fd)

    @property
    def inpod(self) -> bool:
        return self.datapath == istio.DATAPATH_INPOD

    def service_waypoint(self, svc: ServiceEntry) -> Workload | None:
        """Inpod: the waypoint a Service is bound to (its pod), or None."""
        return self.workloads.get(svc.waypoint) if svc.waypoint else None

    def by_hostname(self, host: str) -> ServiceEntry | None:
        """The Service whose ``<name>.<namespace>.svc.cluster.local`` is ``host`` (any of its ports)."""
        return next((s for s in self.services.values() if s.hostname == host), None)

    def kube_dns(self) -> ServiceEntry | None:
        """The kube-dns stand-in's Service (inpod with DNS capture), where DNS queries go upstream."""
        return next((s for s in self.services.values()
                     if s.name == istio.KUBE_DNS_NAME and s.namespace == istio.KUBE_SYSTEM_NS), None)

    def is_vip(self, ip: str) -> bool:
        return any(s.vip == ip for s in self.services.values())

    def resolve(self, ip: str, port: int, rng: random.Random | None = None) -> tuple[Workload, int] | None:
        """Original destination -> (endpoint workload, port): a VIP picks a random endpoint and maps
        servicePort -> targetPort (§4.2 'VIPs are resolved by ztunnel itself'); a pod IP is itself."""
        self.refresh()
        svc = self.service(ip, port)
        if svc is not None:
            eps = [self.workloads[e] for e in svc.endpoints if e in self.workloads]
            if not eps:
                return None
            return (rng or random).choice(eps), svc.target_port
        wl = self.workload(ip)
        return (wl, port) if wl is not None else None

    def waypoint_of(self, wl: Workload) -> Workload | None:
        for ip in wl.waypoints:
            w = self.workloads.get(ip)
            if w is not None:
                return w
        return None

    def is_waypoint_identity(self, identity: str) -> bool:
        return any(w.mode == "waypoint" and w.identity == identity for w in self.workloads.values())

    # ---- persistence ----
    def to_json(self) -> str:
        return json.dumps({
            "trust_domain": self.trust_domain,
            "datapath": self.datapath,
            "workloads": [asdict(w) for w in self.workloads.values()],
            "services": [asdict(s) for s in self.services.values()],
            "ztunnels": self.ztunnels,
            "policies": [asdict(p) for p in self.policies],
        }, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Registry:
        d = json.loads(text)
        r = cls(trust_domain=d["trust_domain"], ztunnels=dict(d["ztunnels"]),
                datapath=d.get("datapath", istio.DATAPATH_1_18))
        for w in d["workloads"]:
            w["waypoints"] = tuple(w.get("waypoints", ()))
            w["labels"] = tuple((k, v) for k, v in w.get("labels", ()))
            r.workloads[w["ip"]] = Workload(**w)
        for s in d["services"]:
            s["endpoints"] = tuple(s["endpoints"])
            r.services[f"{s['vip']}:{s['port']}"] = ServiceEntry(**s)
        for p in d.get("policies", ()):
            r.policies.append(Policy(name=p["name"], namespace=p["namespace"], action=p["action"],
                                     sources=tuple(p.get("sources", ())), ports=tuple(p.get("ports", ()))))
        return r

    @classmethod
    def load(cls, path: str | Path) -> Registry:
        """The registry at ``path``, which it follows from then on (:meth:`refresh`)."""
        reg = cls(trust_domain="")
        reg.source = Path(path)
        if not reg.refresh():
            reg = cls.from_json(Path(path).read_text())  # (a torn file: say why, as before)
        return reg


def _protocol(p: PodInfo) -> tuple[Protocol, bool]:
    if p.mode in ("ambient", "waypoint"):
        return "HBONE", False
    if p.mode == "sidecar" and dict(p.labels).get(istio.LABEL_TUNNEL) == "http":
        return "HBONE", True
    return "TCP", False


def build_registry(plan: Plan, trust_domain: str = istio.TRUST_DOMAIN) -> Registry:
    from netlab.plan.ambient import pod_uid

    reg = Registry(trust_domain=trust_domain, datapath=plan.datapath,
                   policies=list(plan.policies))
    waypoints = [p for p in plan.pods if p.mode == "waypoint"]
    for p in plan.pods:
        if p.mode == "ztunnel":
            reg.ztunnels[p.node] = p.ip
            continue
        proto, native = _protocol(p)
        wps: tuple[str, ...] = ()
        if p.mode == "ambient" and not reg.inpod:
            # an SA-scoped waypoint wins over a namespace-wide one (§7)
            def scope(w: PodInfo) -> str | None:
                return dict(w.labels).get(istio.LABEL_FOR_SERVICE_ACCOUNT)

            scoped = [w.ip for w in waypoints if w.namespace == p.namespace and scope(w) == p.service_account]
            ns_wide = [w.ip for w in waypoints if w.namespace == p.namespace and scope(w) is None]
            wps = tuple(scoped or ns_wide)
        reg.workloads[p.ip] = Workload(
            name=p.name, namespace=p.namespace, ip=p.ip, node=p.node, service_account=p.service_account,
            identity=istio.spiffe_id(p.namespace, p.service_account, trust_domain), protocol=proto, mode=p.mode,
            native_hbone=native, waypoints=wps, app=p.app, labels=tuple(p.labels), uid=pod_uid(p))
    ip_of = {p.ref: p.ip for p in plan.pods}
    for s in plan.services:
        reg.services[f"{s.vip}:{s.port}"] = ServiceEntry(
            name=s.name, namespace=s.namespace, vip=s.vip, port=s.port, target_port=s.target_port,
            endpoints=tuple(ip_of[e] for e in s.endpoints), waypoint=ip_of[s.waypoint] if s.waypoint else "")
    return reg
