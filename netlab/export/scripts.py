"""The files around the objects: the kind cluster file, install.sh, check.sh, a Dockerfile for the
placeholder image, and the README of the export directory (pure text, no I/O).

Node names. kind names its node containers (and so its Node objects) ``<cluster>-worker``,
``<cluster>-worker2``, ...: it has no setting for a node's name, and its maintainers answer
requests for one with "not supported, use labels" (kubernetes-sigs/kind#3562); overriding the
kubelet's ``--hostname-override`` through kubeadmConfigPatches breaks ``kind create``
(kubernetes-sigs/kind#3997). What a Deployment's ``nodeSelector`` matches, though, is the
label ``kubernetes.io/hostname``, and a node's ``labels:`` in the kind file reach the kubelet as
``--node-labels`` (kind's kubeadm templates, InitConfiguration and JoinConfiguration). The kubelet
sets its default labels first and then applies ``--node-labels`` over them, also on every later
registration (kubelet_node_status.go ``initialNode`` / ``updateDefaultLabels``), and
``kubernetes.io/hostname`` is one of the labels a kubelet may set on itself. So each worker gets
``kubernetes.io/hostname: <topology node>`` and the pods land where the topology puts them; the Node
objects keep kind's names (check.sh maps one to the other by that label).

Scripts are written for bash, quote every value, and take only names the topology model already
checked (DNS labels), so nothing from the topology file can break out of a word.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from netlab.export.objects import (
    NODE_LABEL,
    POD_LABEL,
    ExportError,
    Manifests,
    container_name,
)
from netlab.export.releases import (
    GATEWAY_NAME_LABELS,
    PLACEHOLDER_IMAGE,
    TCPDUMP_IMAGE,
    Release,
)
from netlab.plan.types import HopInfo, PathInfo, Plan
from netlab.topology.model import Topology

GENEVE_IFACES = ("istioin", "istioout", "pistioin", "pistioout")
# what a contract's at/iface/listener may hold to be written into check.sh's double-quoted echo lines
_SAFE = re.compile(r"^[A-Za-z0-9_.:/()-]*$")
q = shlex.quote


def kind_config(topo: Topology) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [{"role": "control-plane"}]
    nodes += [{"role": "worker", "labels": {NODE_LABEL: n.name, "netlab.io/node": n.name}} for n in topo.nodes]
    return {"kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4", "name": topo.name,
            "networking": {"serviceSubnet": topo.network.serviceCidr}, "nodes": nodes}


def dockerfile() -> str:
    return f"""\
# The placeholder image of pods with a `command` ({PLACEHOLDER_IMAGE}): Python and curl, as the
# pod's user 65534. Replace it with an image holding your program, or extend it here.
FROM docker.io/library/python:3.12-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
USER 65534:65534
"""


def install_sh(topo: Topology, rel: Release, m: Manifests) -> str:
    nss = " ".join(q(ns) for ns in topo.namespaces)
    pins = "\n".join(f"pin_waypoint {q(ns)} {q(gw)} {q(node)}" for ns, gw, node in m.waypoints)
    image = "" if not m.own_programs else f"""
# pods with a `command` run the placeholder image: build it and load it into the kind nodes
docker build -t {q(PLACEHOLDER_IMAGE)} program-image
kind load docker-image {q(PLACEHOLDER_IMAGE)} --name "$CLUSTER"
"""
    return f"""\
#!/usr/bin/env bash
# netlab export k8s: topology {topo.name}, datapath {rel.datapath} (Istio {rel.istio}, Kubernetes {rel.kubernetes}).
# Creates the kind cluster, installs Istio {rel.istio} with the ambient profile, applies the objects.
# Needs: docker, kind, kubectl, curl, and a network (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
CLUSTER={q(topo.name)}
ISTIO_VERSION={q(rel.istio)}
KIND_NODE_IMAGE={q(rel.kind_node_image)}
GATEWAY_API={q(rel.gateway_api)}

for tool in docker kind kubectl curl; do
  command -v "$tool" >/dev/null || {{ echo "install.sh: needs $tool on PATH" >&2; exit 2; }}
done

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --config kind.yaml --image "$KIND_NODE_IMAGE"
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

# istioctl of the pinned release, downloaded next to this script
if [ ! -x "istio-$ISTIO_VERSION/bin/istioctl" ]; then
  curl -sSL https://istio.io/downloadIstio | ISTIO_VERSION="$ISTIO_VERSION" sh -
fi
ISTIOCTL="./istio-$ISTIO_VERSION/bin/istioctl"

# waypoints are Gateway API Gateways: the CRDs first, if the cluster has none
kubectl get crd gateways.gateway.networking.k8s.io >/dev/null 2>&1 ||
  kubectl apply -k "github.com/kubernetes-sigs/gateway-api/config/crd?ref=$GATEWAY_API"

"$ISTIOCTL" install --set profile=ambient --skip-confirmation
{image}
kubectl apply -f k8s.yaml
kubectl apply -f istio.yaml

# istiod makes a waypoint's Deployment for its Gateway; pin it to the topology's node
pin_waypoint() {{
  local ns=$1 gw=$2 node=$3 deploy="" label
  for _ in $(seq 120); do
    for label in {' '.join(GATEWAY_NAME_LABELS)}; do
      deploy=$(kubectl get deployment -n "$ns" -l "$label=$gw" -o name 2>/dev/null | head -n1)
      [ -n "$deploy" ] && break 2
    done
    sleep 1
  done
  [ -n "$deploy" ] || {{ echo "install.sh: no Deployment for waypoint $ns/$gw after 120s" >&2; return 1; }}
  kubectl patch -n "$ns" "$deploy" --type merge \\
    -p "{{\\"spec\\":{{\\"template\\":{{\\"spec\\":{{\\"nodeSelector\\":{{\\"{NODE_LABEL}\\":\\"$node\\"}}}}}}}}}}"
}}
{pins}
for ns in {nss}; do
  kubectl wait --for=condition=Available deployment --all -n "$ns" --timeout=300s
done
echo "install.sh: {topo.name} is up on kind cluster $CLUSTER (Istio $ISTIO_VERSION); next: ./check.sh"
"""


def check_sh(plan: Plan, rel: Release) -> str:
    out = [f"""\
#!/usr/bin/env bash
# netlab export k8s: send each path's request of topology {plan.topology} with kubectl exec, and print
# per hop of the path's contract the tcpdump command that shows that hop on its node.
# Run the printed commands in other terminals *before* ./check.sh to watch each hop.
set -uo pipefail
cd "$(dirname "$0")"
fail=0

pod() {{ kubectl get pod -n "$1" -l {POD_LABEL}="$2" -o jsonpath='{{.items[0].metadata.name}}'; }}
pod_ip() {{ kubectl get pod -n "$1" -l {POD_LABEL}="$2" -o jsonpath='{{.items[0].status.podIP}}'; }}
kind_node() {{ kubectl get node -l {NODE_LABEL}="$1" -o jsonpath='{{.items[0].metadata.name}}'; }}
ztunnel() {{ kubectl get pod -n istio-system -l app=ztunnel --field-selector spec.nodeName="$(kind_node "$1")" \\
  -o jsonpath="{{.items[0].metadata.name}}"; }}
waypoint() {{ kubectl get pod -n "$1" -l gateway.istio.io/managed=istio.io-mesh-controller -o jsonpath='{{.items[0].metadata.name}}'; }}
# the node-side veth of a pod IP: the device the kind node routes it to
veth_of() {{ docker exec "$(kind_node "$1")" ip -o route get "$2" | sed -n 's/.* dev \\([^ ]*\\).*/\\1/p'; }}
"""]
    for i, p in enumerate(plan.paths):
        for j, h in enumerate(p.hops):
            for key in ("at", "iface", "listener"):
                if not _SAFE.match(getattr(h, key) or ""):
                    raise ExportError(f"paths[{i}].hops[{j}].{key}: {getattr(h, key)[:60]!r} has characters a "
                                      "node, pod, interface or listener name never has")
    if not plan.paths:
        out.append('echo "check.sh: topology declares no paths"\n')
    for p in plan.paths:
        out.append(_path_block(plan, p, rel))
    out.append('exit "$fail"\n')
    return "\n".join(out)


def _path_block(plan: Plan, p: PathInfo, rel: Release) -> str:
    ns, pod = p.from_.split("/", 1)
    client = plan.pod(p.from_)
    container = container_name(client.app)
    url = f"http://{p.to}{p.url}"
    lines = [f"echo {q(f'== path {p.name}: {p.from_} -> {url} (expect {p.expect_status})')}",
             (f"code=$(kubectl exec -n {q(ns)} \"$(pod {q(ns)} {q(pod)})\" -c {q(container)} -- "
              f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 {q(url)})"),
             f"echo \"   status $code\"; [ \"$code\" = {q(str(p.expect_status))} ] || fail=1"]
    if p.hops:
        lines.append("echo '   hops of the contract, and the capture that shows each:'")
    for h in p.hops:
        lines += _hop_lines(h, rel)
    return "\n".join(lines) + "\n"


def _hop_lines(h: HopInfo, rel: Release) -> list[str]:
    where = f"({h.n}) {h.at} " + (f"listener {h.listener}" if h.listener else f"{h.iface} {h.dir or ''}".rstrip())
    lines = [f"echo {q('   ' + where + (': ' + h.what if h.what else ''))}"]
    if not rel.geneve and (h.iface in GENEVE_IFACES or h.iface == "veth(ztunnel)" or h.at.startswith("ztunnel:") and h.iface):
        return lines + [f"echo {q('      (no such hop in ' + rel.datapath + ': the contract is the lab istio-1.18 datapath)')}"]
    kind, _, ref = h.at.partition(":")
    if h.listener:
        proxy, _, _port = h.listener.partition(":")
        logs = {"ztunnel": f'kubectl logs -n istio-system "$(ztunnel {q(ref)})"',
                "sidecar": 'kubectl logs -n {ns} "$(pod {ns} {pod})" -c istio-proxy'.format(
                    ns=q(ref.split("/")[0]), pod=q(ref.split("/")[-1])),
                "waypoint": f'kubectl logs -n {q(ref.split("/")[0])} "$(waypoint {q(ref.split("/")[0])})"'}[proxy]
        return lines + [f'echo "      a proxy hop, no packet of its own: {logs.replace(chr(34), chr(92) + chr(34))}"']
    bpf = "tcp[tcpflags] & tcp-syn != 0" + (f" and port {h.port}" if h.port else "")
    direction = f" -Q {h.dir}" if h.dir else ""
    iface = _iface_expr(h.iface or "any", kind, ref)
    dump = f"tcpdump -ni {iface}{direction} '{bpf}'"
    if kind == "node":
        cmd = f"kubectl debug node/$(kind_node {q(ref)}) -it --image={TCPDUMP_IMAGE} -- {dump}"
    elif kind == "pod":
        ns, pod = ref.split("/", 1)
        cmd = f"kubectl debug -n {q(ns)} $(pod {q(ns)} {q(pod)}) -it --image={TCPDUMP_IMAGE} -- {dump}"
    elif kind == "ztunnel":
        cmd = f"kubectl debug -n istio-system $(ztunnel {q(ref)}) -it --image={TCPDUMP_IMAGE} -- {dump}"
    else:  # waypoint:<ns>[/<name>]
        ns = ref.split("/")[0]
        cmd = f"kubectl debug -n {q(ns)} $(waypoint {q(ns)}) -it --image={TCPDUMP_IMAGE} -- {dump}"
    return lines + [f'echo "      {cmd.replace(chr(34), chr(92) + chr(34))}"']


def _iface_expr(iface: str, kind: str, ref: str) -> str:
    """Symbolic interfaces of a contract (veth(<ns>/<pod>), veth(ztunnel), veth(waypoint:<ns>))
    resolved when check.sh runs: the node-side veth of that pod's IP on the hop's node."""
    if not iface.startswith("veth("):
        return iface
    target = iface[5:-1]
    if target == "ztunnel":
        ip = f"$(kubectl get pod -n istio-system $(ztunnel {q(ref)}) -o jsonpath='{{.status.podIP}}')"
    elif target.startswith("waypoint:"):
        wns = target[9:].split("/")[0]
        ip = f"$(kubectl get pod -n {q(wns)} $(waypoint {q(wns)}) -o jsonpath='{{.status.podIP}}')"
    else:
        tns, tpod = target.split("/", 1)
        ip = f"$(pod_ip {q(tns)} {q(tpod)})"
    return f"$(veth_of {q(ref)} {ip})"


def readme(topo: Topology, rel: Release, m: Manifests) -> str:
    srcs = "\n".join(f"| {app} | `{s.image}` | `{rel.source_url(s.source)}` |" for app, s in rel.samples.items())
    own = "" if not m.own_programs else f"""
Pods with a `command` (your own programs) run the placeholder image `{PLACEHOLDER_IMAGE}`, built by
install.sh from `program-image/Dockerfile` (Python 3.12 and curl) and loaded into the kind nodes, with
the pod's command, as the pod's user 65534 (as in the lab), and with the unprivileged-port sysctl
the lab's pod netns has. Put your program into that image, or change `image:` in k8s.yaml.
"""
    geneve = ("" if rel.geneve else
              "\nThe hop contracts in check.sh describe the lab's istio-1.18 datapath; on Istio "
              f"{rel.istio} (in-pod redirection) the node Geneve tunnels and the ztunnel pod's own hops do "
              "not exist, and check.sh says so at those hops.\n")
    return f"""\
# {topo.name} on a real cluster (kind + Istio {rel.istio})

Written by `netlab export k8s {topo.name} --datapath {rel.datapath}`. Same namespaces (and labels),
service accounts, pods (one Deployment each, pinned to its node), services, waypoints and L4
policies as the lab, for Istio {rel.istio} (`istio/istio@{rel.istio_commit}`).

| file | what |
|---|---|
| `kind.yaml` | a kind cluster: a control plane and one worker per topology node |
| `k8s.yaml` | Namespaces, ServiceAccounts, Deployments, Services (validated against Kubernetes {rel.kubernetes}) |
| `istio.yaml` | waypoint Gateways (`{rel.gateway_api_version}`) and AuthorizationPolicies (`{rel.authz_api_version}`) |
| `install.sh` | creates the cluster, installs Istio {rel.istio} (`istioctl install --set profile=ambient`), applies the objects, pins waypoints |
| `check.sh` | sends each path's request with `kubectl exec` and prints, per hop of its contract, the tcpdump command for that hop |

## What needs a network

Exporting needs none. Running `install.sh` downloads: the kind node image `{rel.kind_node_image}`;
istioctl {rel.istio} (istio.io/downloadIstio) and Istio's images; the Gateway API {rel.gateway_api} CRDs
(github.com/kubernetes-sigs/gateway-api) when the cluster has none; the sample images below;
{'the placeholder image base (python:3.12-slim) and curl from Debian; ' if m.own_programs else ''}and
check.sh's tcpdump commands use `{TCPDUMP_IMAGE}` (`kubectl debug`).

## Sample images

| app | image | from |
|---|---|---|
{srcs}

The images are read from stored copies of those files, not from the tag itself: check them against
the tag before relying on an exact version. Built-in apps listen on the topology's ports.
{own}
## What it reproduces, and what differs

* Nodes: kind cannot name its nodes; each worker carries the label `kubernetes.io/hostname:
  <topology node>` (and `netlab.io/node`), which is what the Deployments' `nodeSelector` matches. The
  Node objects keep kind's names (`{topo.name}-worker`, ...).
* Addresses: pod IPs and service VIPs are the cluster's, not the lab's (the service CIDR is the
  topology's, so a pinned `clusterIP` stays valid).
* Waypoints: istiod creates each waypoint's Deployment; install.sh then sets its `nodeSelector`.
* Policies: the lab's L4 AuthorizationPolicy model (docs/policies.md in netlab), namespace-wide.
{geneve}"""
