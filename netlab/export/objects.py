"""Topology -> the Kubernetes and Istio objects of the same scenario, as plain dicts (pure, no I/O).

Why each mapping is what it is:

* one Deployment per pod (replicas 1), pinned with ``nodeSelector: kubernetes.io/hostname: <node>``;
  the kind cluster file gives each worker that hostname label (see ``scripts.kind_config``). Its
  selector carries ``netlab.io/pod: <pod>`` because a namespace may hold two pods of one app
  (ambient-to-ambient's httpbin and httpbin-local) that Services still tell apart by their labels;
* built-in apps run the release's Istio sample image (``releases.SampleImage``), told the
  topology's port; a pod's own ``command`` runs in the placeholder image as the pod's user
  (65534, as in the lab) with unprivileged low ports, as the lab's pod netns has;
* Services keep the topology's ports and selector (a fixed ``clusterIP`` only where the topology
  pins one: the kind file gives the cluster the topology's service CIDR);
* waypoints in the form the release expects, and L4 policies as AuthorizationPolicy with the
  lab's semantics (docs/policies.md): every listed source is its own ``from`` entry (Istio ANDs
  the fields inside one source, the lab ORs the sources), ``to_ports`` become ``to.operation.ports``
  (strings, as Istio's API has them), and an empty policy matches everything (``rules: [{}]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from netlab.export.releases import (
    ANNOTATION_FOR_SA,
    LABEL_USE_WAYPOINT,
    PLACEHOLDER_IMAGE,
    WAYPOINT_CLASS,
    WAYPOINT_LISTENER,
    Release,
)
from netlab.plan.build import DEFAULT_APP_PORTS, POD_GID, POD_UID
from netlab.topology.model import Pod, Topology

POD_LABEL = "netlab.io/pod"
NODE_LABEL = "kubernetes.io/hostname"
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ExportError(ValueError):
    """The topology has something a real cluster cannot be given; the message names it."""


@dataclass
class Manifests:
    core: list[dict[str, Any]] = field(default_factory=list)  # Namespaces, SAs, Deployments, Services
    istio: list[dict[str, Any]] = field(default_factory=list)  # Gateways (waypoints), AuthorizationPolicies
    waypoints: list[tuple[str, str, str]] = field(default_factory=list)  # (namespace, gateway, node) to pin
    own_programs: bool = False  # some pod runs the placeholder image (install.sh builds it)


def build(topo: Topology, rel: Release) -> Manifests:
    m = Manifests()
    ns_labels = {ns: dict(n.labels) for ns, n in topo.namespaces.items()}
    svc_labels: dict[tuple[str, str], dict[str, str]] = {}
    _waypoints(topo, rel, m, ns_labels, svc_labels)
    for ns in topo.namespaces:
        m.core.append(_meta("v1", "Namespace", ns, None, labels=ns_labels[ns]))
    sas = sorted({(p.namespace, p.serviceAccount) for p in topo.pods if p.serviceAccount})
    m.core += [_meta("v1", "ServiceAccount", sa, ns) for ns, sa in sas]
    for i, p in enumerate(topo.pods):
        m.core.append(_deployment(i, p, rel, m))
    for s in topo.services:
        port: dict[str, Any] = {"port": s.port, "targetPort": s.targetPort or s.port, "protocol": "TCP"}
        if _speaks_http(topo, s.namespace, s.selector):
            port["name"] = "http"  # Istio's protocol selection by port name, as the samples do
        spec: dict[str, Any] = {"selector": dict(s.selector), "ports": [port]}
        if s.clusterIP:
            spec["clusterIP"] = s.clusterIP
        m.core.append(_meta("v1", "Service", s.name, s.namespace, labels=svc_labels.get((s.namespace, s.name)), spec=spec))
    for pol in topo.policies:
        m.istio.append(_authz(pol, rel))
    return m


def _meta(api: str, kind: str, name: str, ns: str | None, *, labels: dict[str, str] | None = None,
          annotations: dict[str, str] | None = None, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name}
    if ns is not None:
        md["namespace"] = ns
    if labels:
        md["labels"] = dict(labels)
    if annotations:
        md["annotations"] = dict(annotations)
    obj: dict[str, Any] = {"apiVersion": api, "kind": kind, "metadata": md}
    if spec is not None:
        obj["spec"] = spec
    return obj


def _container(i: int, p: Pod, rel: Release, m: Manifests) -> dict[str, Any]:
    ports = list(p.ports) or list(DEFAULT_APP_PORTS.get(p.app_name, ()))
    c: dict[str, Any] = {"name": container_name(p.app_name)}
    if p.command is not None:
        m.own_programs = True
        c.update(image=PLACEHOLDER_IMAGE, imagePullPolicy="Never", command=list(p.command),
                 securityContext={"runAsUser": POD_UID, "runAsGroup": POD_GID, "allowPrivilegeEscalation": False})
        if p.readiness:
            probe: dict[str, Any] = ({"httpGet": {"path": p.readiness.path, "port": p.readiness.port}} if p.readiness.path
                                     else {"tcpSocket": {"port": p.readiness.port}})
            c["readinessProbe"] = {**probe, "periodSeconds": 2}
    elif p.app_name in rel.samples:
        img = rel.samples[p.app_name]
        if img.fixed_port is not None and ports not in ([], [img.fixed_port]):
            raise ExportError(f"pods[{i}] ({p.namespace}/{p.name}): the {p.app_name} sample image listens on "
                              f"{img.fixed_port} only, not {ports}")
        if img.command and len(ports) > 1 or any("{port}" in v for _, v in img.env) and len(ports) != 1:
            raise ExportError(f"pods[{i}] ({p.namespace}/{p.name}): the {p.app_name} sample image serves one port; "
                              f"the topology gives {ports or 'none'}")
        sub = {"{port}": str(ports[0]) if ports else "", "{version}": p.version}
        c["image"] = _fill(img.image, sub)
        c["imagePullPolicy"] = "IfNotPresent"
        if img.command:
            c["command"] = [_fill(a, sub) for a in img.command]
        if img.env:
            c["env"] = [{"name": k, "value": _fill(v, sub)} for k, v in img.env]
    else:
        raise ExportError(f"pods[{i}] ({p.namespace}/{p.name}): app {p.app_name!r} has no Istio sample image "
                          f"(those are {', '.join(rel.samples)}); give the pod a command to export it")
    if ports:
        c["ports"] = [{"containerPort": port, "protocol": "TCP"} for port in ports]
    return c


def container_name(app: str) -> str:
    """The pod's one container is named after its app, where that is a DNS label (else ``app``)."""
    return app if _DNS_LABEL.match(app) else "app"


def _fill(s: str, sub: dict[str, str]) -> str:
    for k, v in sub.items():
        s = s.replace(k, v)
    return s


def _deployment(i: int, p: Pod, rel: Release, m: Manifests) -> dict[str, Any]:
    labels = {"app": p.app_name, "version": p.version, **p.labels, POD_LABEL: p.name}
    pod_spec: dict[str, Any] = {"nodeSelector": {NODE_LABEL: p.node}, "containers": [_container(i, p, rel, m)],
                                "terminationGracePeriodSeconds": 0}
    if p.serviceAccount:
        pod_spec["serviceAccountName"] = p.serviceAccount
    if p.command is not None:  # the lab's pod netns lets the pod's user bind low ports; so does this
        pod_spec["securityContext"] = {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]}
    tmpl_md: dict[str, Any] = {"labels": labels}
    if p.annotations:
        tmpl_md["annotations"] = dict(p.annotations)
    return _meta("apps/v1", "Deployment", p.name, p.namespace, labels={"app": p.app_name, POD_LABEL: p.name},
                 spec={"replicas": 1, "selector": {"matchLabels": {POD_LABEL: p.name}},
                       "template": {"metadata": tmpl_md, "spec": pod_spec}})


def _selected(topo: Topology, ns: str, selector: dict[str, str]) -> list[Pod]:
    """The pods a Service's selector picks (labels as the lab gives them: app, version, own labels)."""
    return [p for p in topo.pods if p.namespace == ns and selector
            and all({"app": p.app_name, "version": p.version, **p.labels}.get(k) == v for k, v in selector.items())]


def _speaks_http(topo: Topology, ns: str, selector: dict[str, str]) -> bool:
    pods = _selected(topo, ns, selector)
    return bool(pods) and all(p.command is None and p.app_name in ("httpbin", "helloworld") for p in pods)


def _waypoints(topo: Topology, rel: Release, m: Manifests, ns_labels: dict[str, dict[str, str]],
               svc_labels: dict[tuple[str, str], dict[str, str]]) -> None:
    for w in topo.waypoints:
        annotations, labels = None, None
        if rel.waypoint_binding == "for-service-account":
            if w.serviceAccount:
                annotations = {ANNOTATION_FOR_SA: w.serviceAccount}
        else:
            labels = {"istio.io/waypoint-for": "service"}
            if not w.serviceAccount:  # every service of the namespace
                ns_labels[w.namespace][LABEL_USE_WAYPOINT] = w.name
            else:  # the services whose pods all run as that service account
                for s in topo.services:
                    eps = _selected(topo, w.namespace, s.selector) if s.namespace == w.namespace else []
                    if eps and all(p.serviceAccount == w.serviceAccount for p in eps):
                        svc_labels.setdefault((s.namespace, s.name), {})[LABEL_USE_WAYPOINT] = w.name
        m.istio.append(_meta(rel.gateway_api_version, "Gateway", w.name, w.namespace, labels=labels, annotations=annotations,
                             spec={"gatewayClassName": WAYPOINT_CLASS, "listeners": [dict(WAYPOINT_LISTENER)]}))
        m.waypoints.append((w.namespace, w.name, w.node))


def _authz(pol: Any, rel: Release) -> dict[str, Any]:
    principals = [s.removeprefix("spiffe://") for s in pol.from_ if s != "*" and not s.startswith("ns/")]
    if "*" in pol.from_:
        principals.append("*")  # any authenticated identity
    namespaces = [s[3:] for s in pol.from_ if s.startswith("ns/")]
    rule: dict[str, Any] = {}
    sources = ([{"source": {"principals": principals}}] if principals else []) + \
              ([{"source": {"namespaces": namespaces}}] if namespaces else [])
    if sources:
        rule["from"] = sources
    if pol.to_ports:
        rule["to"] = [{"operation": {"ports": [str(p) for p in pol.to_ports]}}]
    return _meta(rel.authz_api_version, "AuthorizationPolicy", pol.name, pol.namespace,
                 spec={"action": pol.action, "rules": [rule]})
