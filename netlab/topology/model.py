"""The topology file: a small Kubernetes-like cluster described in YAML, validated with pydantic.

Field names follow Kubernetes spelling (``serviceAccount``, ``targetPort``, ``podCidr``) so a
reader can map the file to the manifests of the seed article. Unknown keys are errors: a typo
must not silently become a default.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from netlab import istio
from netlab.names import (
    IFNAMSIZ,
    LAB_NAME_MAX,
    NAME_MAX,
    BadName,
    cert_dir_name,
    check_label,
    check_subdomain,
    shown,
)

KNOWN_APPS = ("httpbin", "helloworld", "sleep", "sink", "echo")
MAX_ARGV, MAX_ARG_LEN = 256, 4096  # an own program's command: bounded, like a container's args


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Node(_Model):
    name: str
    podCidr: str | None = Field(default=None, description="pod CIDR owned by this node; default 10.0.<index>.0/24")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # The fabric-side end of the node's uplink veth is named after the node.
        return check_label(v, "node name", IFNAMSIZ)

    @field_validator("podCidr")
    @classmethod
    def _cidr(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            net = ipaddress.IPv4Network(v, strict=True)
        except ValueError as e:
            raise ValueError(f"podCidr {shown(v)} is not an IPv4 network in CIDR form ({e})") from None
        if net.prefixlen > 29:
            raise ValueError(f"podCidr {shown(v)} is too small; use /29 or larger")
        return str(net)


class Namespace(_Model):
    labels: dict[str, str] = Field(default_factory=dict)


class Readiness(_Model):
    """When an own program (``command``) is serving: ``up`` waits until a TCP connect to ``port``
    succeeds from inside the pod (to 127.0.0.1, else the pod's IP), and with ``path`` until an HTTP
    GET of it answers 200-399, the success range of a Kubernetes ``httpGet`` probe."""

    port: StrictInt
    path: str | None = Field(default=None, description="HTTP path to GET, e.g. /healthz; leave out for a TCP check")

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 1 <= v <= 65535:
            raise ValueError(f"port {v} is outside 1..65535")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        # it goes into a request line: visible ASCII only, no spaces, bounded
        if v is not None and not re.fullmatch(r"/[\x21-\x7e]{0,1023}", v):
            raise ValueError(f"path {v[:60]!r} must start with '/' and hold at most 1024 visible ASCII characters, no spaces")
        return v


class Pod(_Model):
    name: str
    namespace: str
    node: str
    app: str | None = Field(default=None, description="app label; also picks the program: httpbin, helloworld, sleep, sink, echo")
    serviceAccount: str | None = None
    ports: list[StrictInt] = Field(default_factory=list, description="container ports")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    version: str = "v1"
    # validate_default: the check that a pod runs *some* program needs to run when command is left out
    command: list[str] | None = Field(default=None, validate_default=True,
                                      description="your own program: argv run in the pod's netns as the pod's user "
                                                  "(docs: README 'Your own programs')")
    readiness: Readiness | None = Field(default=None, validate_default=True,
                                        description="what `up` waits for before it calls the program ready")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_label(v, "pod name")

    @field_validator("serviceAccount")
    @classmethod
    def _sa(cls, v: str | None) -> str | None:
        return v if v is None else check_subdomain(v, "serviceAccount")

    @model_validator(mode="after")
    def _identity(self) -> Pod:
        check_label(self.namespace, "namespace")  # a part of the pod's netns name and identity
        ident = istio.spiffe_id(self.namespace, self.sa)
        try:
            cert_dir_name(ident)  # the identity names the pod's certificate directory
        except BadName:
            raise ValueError(f"serviceAccount {shown(self.sa)} ({len(self.sa)} characters) in namespace "
                             f"{shown(self.namespace)}: the identity is too long to name a certificate directory "
                             f"({NAME_MAX} bytes): use a shorter one") from None
        return self

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            app = info.data.get("app")
            if app is not None and app not in KNOWN_APPS:
                raise ValueError(f"required: app {app!r} is not a built-in program ({', '.join(KNOWN_APPS)}); "
                                 "say what the pod runs with command: [argv ...]")
            return v
        if not v or not v[0]:
            raise ValueError("must be a non-empty list: [program, arg ...]")
        if len(v) > MAX_ARGV:
            raise ValueError(f"has {len(v)} arguments; at most {MAX_ARGV} allowed")
        for i, a in enumerate(v):
            if "\0" in a or len(a) > MAX_ARG_LEN:
                raise ValueError(f"argument {i} must be at most {MAX_ARG_LEN} characters without NUL")
        return v

    @field_validator("readiness")
    @classmethod
    def _readiness(cls, v: Readiness | None, info: ValidationInfo) -> Readiness | None:
        if v is not None and info.data.get("command") is None:
            raise ValueError("needs a command (the built-in apps announce readiness themselves)")
        return v

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if not 1 <= p <= 65535:
                raise ValueError(f"port {p} is outside 1..65535")
            if 15000 <= p <= 15090 and p in (15000, 15001, 15006, 15008, 15020, 15021, 15053, 15080, 15090):
                raise ValueError(f"port {p} is reserved for the mesh's proxies")
        if len(set(v)) != len(v):
            raise ValueError("ports must be unique")
        return v

    @property
    def app_name(self) -> str:
        return self.app or self.name

    @property
    def sa(self) -> str:
        return self.serviceAccount or istio.DEFAULT_SA


class Service(_Model):
    name: str
    namespace: str
    port: StrictInt
    targetPort: StrictInt | None = None
    selector: dict[str, str] = Field(default_factory=dict)
    clusterIP: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="e.g. istio.io/use-waypoint: <waypoint> (datapath inpod)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_label(v, "service name")

    @field_validator("port", "targetPort")
    @classmethod
    def _port(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= 65535:
            raise ValueError(f"port {v} is outside 1..65535")
        return v

    @field_validator("clusterIP")
    @classmethod
    def _vip(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ipaddress.IPv4Address(v)
            except ValueError:
                raise ValueError(f"clusterIP {shown(v)} is not an IPv4 address") from None
        return v


class Waypoint(_Model):
    namespace: str
    node: str
    name: str = "waypoint"
    serviceAccount: str | None = Field(default=None, description="scope the waypoint to one service account")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_label(v, "waypoint name")  # a part of the waypoint pod's netns name

    @field_validator("serviceAccount")
    @classmethod
    def _sa(cls, v: str | None) -> str | None:
        return v if v is None else check_subdomain(v, "serviceAccount")


class Hop(_Model):
    """One expected hop of a request path, numbered as in the seed article (checked by `netlab trace`).

    A hop is either a packet sighting (``iface`` + ``dir``: the TCP SYN of the leg was seen leaving
    or entering that interface of the ``at`` namespace) or a proxy accepting the leg (``listener``).
    Every field left out matches anything, so a contract says only what the seed asserts.
    """

    n: str = Field(description="the seed's hop number, e.g. '1', '6', 'w2'; several hops may share one")
    at: str = Field(description="where: node:<node>, pod:<ns>/<pod>, ztunnel:<node>, waypoint:<ns>[/<name>]")
    iface: str | None = Field(default=None, description="interface, or a symbolic one: veth(<ns>/<pod>), veth(ztunnel), "
                                                         "veth(waypoint:<ns>), eth0, lo, istioin, istioout, pistioin, pistioout")
    dir: Literal["in", "out"] | None = Field(default=None, description="in: received on iface; out: sent on it")
    port: int | None = Field(default=None, description="destination port of the SYN at this hop")
    listener: str | None = Field(default=None, description="proxy listener that accepted the leg: ztunnel:15001, sidecar:15006, waypoint:15008")
    rules: list[str] = Field(default_factory=list, description="iptables rule refs that must have matched here, e.g. '§1.5 mangle ztunnel-PREROUTING #15'")
    table: int | None = Field(default=None, description="route table the kernel picked here (254 = main)")
    what: str = ""

    @model_validator(mode="after")
    def _kind(self) -> Hop:
        if self.listener is None and self.iface is None:
            raise ValueError(f"hop ({self.n}) at {self.at}: give an iface (packet hop) or a listener (proxy hop)")
        if self.listener is not None and self.iface is not None:
            raise ValueError(f"hop ({self.n}) at {self.at}: a hop is either a packet (iface) or a proxy (listener), not both")
        if not re.fullmatch(r"(node|pod|ztunnel|waypoint):\S+", self.at):
            raise ValueError(f"hop ({self.n}): at {shown(self.at)} must be node:<node>, pod:<ns>/<pod>, ztunnel:<node> or waypoint:<ns>[/<name>]")
        if self.listener is not None and not re.fullmatch(r"(ztunnel|sidecar|waypoint):[0-9]{1,5}", self.listener):
            raise ValueError(f"hop ({self.n}): listener {shown(self.listener)} must be ztunnel|sidecar|waypoint:<port>")
        return self


class RequestPath(_Model):
    """A request the topology exists to show, with its hop contract (checked by `netlab trace`)."""

    name: str
    from_: str = Field(alias="from", description="client pod, <ns>/<pod>")
    to: str = Field(description="host[:port], e.g. httpbin.bar:8000")
    url: str = "/"
    expect_status: int = 200
    expect_body: str | None = None
    source_seen: Literal["client", "waypoint", "local"] = "client"
    hops: list[Hop] = Field(default_factory=list)


class Network(_Model):
    fabric: str = "172.172.0.0/16"
    serviceCidr: str = "10.96.0.0/16"

    @field_validator("fabric", "serviceCidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Network(v, strict=True))
        except ValueError as e:
            raise ValueError(f"{shown(v)} is not an IPv4 network in CIDR form ({e})") from None


class AuthorizationPolicy(_Model):
    """An L4 AuthorizationPolicy (Istio ``security.istio.io/v1beta1``), enforced by the
    destination's ztunnel on inbound connections (docs/policies.md).

    Applies to every workload of ``namespace``. ``from`` lists sources: SPIFFE principals
    (``spiffe://cluster.local/ns/foo/sa/sleep``, or Istio's ``cluster.local/ns/foo/sa/sleep``),
    ``ns/<namespace>`` for any identity of that namespace, or ``*`` for any authenticated identity;
    empty means every source (also plaintext). ``to_ports`` (destination target ports) empty
    means every port. DENY wins over ALLOW; once one ALLOW exists for a namespace, only sources
    matching some ALLOW get in.
    """

    name: str
    namespace: str
    action: Literal["ALLOW", "DENY"] = "ALLOW"
    from_: list[str] = Field(default_factory=list, alias="from")
    to_ports: list[int] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_label(v, "policy name")

    @field_validator("from_")
    @classmethod
    def _from(cls, v: list[str]) -> list[str]:
        for s in v:
            if s == "*":
                continue
            if s.startswith("ns/"):
                check_label(s[3:], "namespace in 'from'")
                continue
            body = s.removeprefix("spiffe://")
            m = re.fullmatch(r"([a-z0-9.-]+)/ns/([^/]+)/sa/([^/]+)", body)
            if not m:
                raise ValueError(f"source {shown(s)} must be a SPIFFE principal (spiffe://<td>/ns/<ns>/sa/<sa>), "
                                 "'ns/<namespace>' or '*'")
            check_label(m.group(2), "namespace in 'from'")
            check_subdomain(m.group(3), "service account in 'from'")
        return v

    @field_validator("to_ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if not 1 <= p <= 65535:
                raise ValueError(f"port {p} is outside 1..65535")
        return v


Datapath = Literal["istio-1.18", "inpod"]


class InpodOptions(_Model):
    """Install-wide choices of the in-pod datapath (``datapath: inpod``); the defaults are the
    pinned release's ambient profile (reference istio-inpod-datapath.md §1.1, §4.2, §5)."""

    dnsCapture: bool = Field(default=True, description="Helm ambient.dnsCapture: ztunnel answers DNS inside each "
                                                       "enrolled pod (15053) and pods resolve through kube-dns; "
                                                       "false: no DNS rules, names from the lab's /etc/hosts")
    sidecarTunnel: Literal["http", "none"] = Field(
        default="http", description="the injector labels sidecar pods networking.istio.io/tunnel=http (ambient "
                                    "profile): ambient clients reach them over HBONE on 15008; none: plain TCP")


class Topology(_Model):
    name: str
    description: str = ""
    datapath: Datapath = Field(default="istio-1.18", description="istio-1.18 (the seed's node Geneve datapath) or "
                                                                 "inpod (Istio 1.30.3: redirection inside each pod)")
    inpod: InpodOptions = Field(default_factory=InpodOptions)
    network: Network = Field(default_factory=Network)
    nodes: list[Node]
    namespaces: dict[str, Namespace] = Field(default_factory=dict)
    pods: list[Pod] = Field(default_factory=list)
    services: list[Service] = Field(default_factory=list)
    waypoints: list[Waypoint] = Field(default_factory=list)
    paths: list[RequestPath] = Field(default_factory=list)
    policies: list[AuthorizationPolicy] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_label(v, "topology name", LAB_NAME_MAX)  # the default lab name

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, v: dict[str, Namespace]) -> dict[str, Namespace]:
        for ns in v:
            check_label(ns, "namespace name")  # Kubernetes: ValidateNamespaceName is a DNS-1123 label
            if ns == istio.ISTIO_SYSTEM_NS:
                raise ValueError(f"namespace {ns!r} is reserved for the lab's ztunnel pods")
        return v

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: list[Node]) -> list[Node]:
        if not v:
            raise ValueError("at least one node is required")
        return v

    @model_validator(mode="after")
    def _refs(self) -> Topology:
        _unique([n.name for n in self.nodes], "node")
        nodes = {n.name for n in self.nodes}
        _unique([f"{p.namespace}/{p.name}" for p in self.pods], "pod")
        for i, p in enumerate(self.pods):
            if p.node not in nodes:
                raise ValueError(f"pods[{i}] ({p.namespace}/{p.name}): node {shown(p.node)} is not defined in nodes")
            if p.namespace not in self.namespaces:
                raise ValueError(f"pods[{i}] ({p.namespace}/{p.name}): namespace {shown(p.namespace)} is not defined in namespaces")
        _unique([f"{s.namespace}/{s.name}" for s in self.services], "service")
        for i, s in enumerate(self.services):
            if s.namespace not in self.namespaces:
                raise ValueError(f"services[{i}] ({s.namespace}/{s.name}): namespace {shown(s.namespace)} is not defined in namespaces")
        for i, w in enumerate(self.waypoints):
            if w.node not in nodes:
                raise ValueError(f"waypoints[{i}]: node {shown(w.node)} is not defined in nodes")
            if w.namespace not in self.namespaces:
                raise ValueError(f"waypoints[{i}]: namespace {shown(w.namespace)} is not defined in namespaces")
            if self.mode_of_namespace(w.namespace) != "ambient":
                raise ValueError(f"waypoints[{i}]: namespace {shown(w.namespace)} is not ambient (label {istio.LABEL_DATAPLANE_MODE}: ambient)")
        _unique([f"{w.namespace}/{w.name}" for w in self.waypoints], "waypoint")
        clash = {f"{w.namespace}/{w.name}" for w in self.waypoints} & {f"{p.namespace}/{p.name}" for p in self.pods}
        if clash:
            raise ValueError(f"waypoint and pod share a name: {', '.join(sorted(clash))}")
        pods = {f"{p.namespace}/{p.name}" for p in self.pods}
        for i, rp in enumerate(self.paths):
            if rp.from_ not in pods:
                raise ValueError(f"paths[{i}] ({rp.name}): client pod {shown(rp.from_)} is not defined in pods (use <namespace>/<pod>)")
        return self

    @model_validator(mode="after")
    def _policies(self) -> Topology:
        _unique([f"{p.namespace}/{p.name}" for p in self.policies], "policy")
        for i, p in enumerate(self.policies):
            if p.namespace not in self.namespaces:
                raise ValueError(f"policies[{i}] ({p.name}): namespace {shown(p.namespace)} is not defined in namespaces")
        return self

    def mode_of_namespace(self, ns: str) -> Literal["ambient", "sidecar", "plain"]:
        labels = self.namespaces[ns].labels if ns in self.namespaces else {}
        if labels.get(istio.LABEL_INJECTION) == istio.INJECTION_ENABLED:
            return "sidecar"
        if labels.get(istio.LABEL_DATAPLANE_MODE) == istio.DATAPLANE_MODE_AMBIENT:
            return "ambient"
        return "plain"

    def mode_of_pod(self, pod: Pod) -> Literal["ambient", "sidecar", "plain"]:
        """Sidecar injection wins over ambient (the pod gets sidecar.istio.io/status, §3).

        Enrollment differs per datapath. 1.18 (reference §3): the namespace label, unless the
        pod is annotated ``ambient.istio.io/redirection: disabled``. inpod (inpod reference
        §2.3, the chart's enablement selectors): the pod label ``istio.io/dataplane-mode:
        ambient``, or the namespace label with a pod label other than ``none``; the redirection
        annotation is istio-cni's output there, not an input."""
        mode = self.mode_of_namespace(pod.namespace)
        if pod.labels.get("sidecar.istio.io/inject") == "false" or pod.annotations.get("sidecar.istio.io/inject") == "false":
            mode = "plain" if mode == "sidecar" else mode
        if self.datapath == istio.DATAPATH_INPOD:
            label = pod.labels.get(istio.LABEL_DATAPLANE_MODE)
            if mode != "sidecar":
                if label == istio.DATAPLANE_MODE_AMBIENT:
                    mode = "ambient"
                elif label == istio.DATAPLANE_MODE_NONE:
                    mode = "plain"
            return mode
        if mode == "ambient" and pod.annotations.get(istio.ANNOTATION_REDIRECTION) == "disabled":
            mode = "plain"
        return mode

    @property
    def has_ambient(self) -> bool:
        """Whether the lab runs ztunnels: an ambient namespace, or (inpod) a pod enrolled by its own label."""
        return (any(self.mode_of_namespace(ns) == "ambient" for ns in self.namespaces)
                or any(self.mode_of_pod(p) == "ambient" for p in self.pods))


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"duplicate {what} {n!r}")
        seen.add(n)
