"""Every choice of `netlab export k8s` that depends on the datapath (the Istio release), in one place.

The lab reproduces two datapaths: ``istio-1.18`` (Istio 1.18.2: node Geneve tunnels into the
ztunnel pod) and ``inpod`` (Istio 1.30.3: redirection inside each pod's netns). An export is pinned
to one of them: the Istio release ``install.sh`` installs, the Kubernetes release whose schema the
objects are checked against (and whose kind node image the cluster runs), the API versions of the
Istio objects, the form of a waypoint, and the sample images. ``--datapath`` picks one; when the
topology gains a ``datapath`` key (issue 19), :func:`choose` takes its default from there.

Where the facts come from (read, never copied, from the pinned sources named in
shared/reference/*.md, section 0):

* Istio releases and commits: istio/istio@1.18.2 = 0183f288..., istio/istio@1.30.3 = 56df41f6...
* Kubernetes: Istio 1.18 supports Kubernetes 1.24-1.27 (its release announcement); 1.27 is the newest
  of those that kubernetes-validate ships a schema for. For 1.30.3 the export uses 1.33 (an
  assumption: inside the window Istio 1.30 is tested against, not read from its support table).
* Waypoints: 1.18 -- a Gateway of class ``istio-waypoint``, scoped to one service account by the
  annotation ``istio.io/for-service-account`` (reference 1.18 §7, pkg/config/constants). Current --
  class ``istio-waypoint``, listener ``mesh`` 15008 ``HBONE`` (istioctl/pkg/waypoint/waypoint.go
  L91-93), bound by the label ``istio.io/use-waypoint`` on a Namespace or Service (inpod reference
  §3.6, pilot/pkg/serviceregistry/ambient/waypoints.go L99-149).
* AuthorizationPolicy: ``security.istio.io/v1beta1`` in 1.18; ``security.istio.io/v1`` (served
  since 1.22) in 1.30.3.
* Sample images: the ``samples/`` file of the release named in each ``SampleImage.source``. The
  stored copies these were read from are not tied to a tag: check them against the tag before
  relying on an exact image (README of the export says so too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_DATAPATH = "istio-1.18"
PLACEHOLDER_IMAGE = "localhost/netlab-program:latest"  # built by install.sh for pods with a `command`
TCPDUMP_IMAGE = "docker.io/nicolaka/netshoot:v0.13"  # the debug image check.sh's tcpdump commands use


@dataclass(frozen=True)
class SampleImage:
    """How a built-in app runs in a real cluster: an Istio sample image, and how it is told the
    topology's port (``{port}`` in command/env is replaced; ``fixed_port``: it cannot be told)."""

    image: str  # "{version}" is replaced by the pod's version (helloworld v1/v2)
    source: str  # the release's samples/ file the image comes from
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    fixed_port: int | None = None


@dataclass(frozen=True)
class Release:
    datapath: Literal["istio-1.18", "inpod"]
    istio: str  # the Istio release install.sh installs
    istio_commit: str
    kubernetes: str  # schema release for validation, and the kind node image's
    kind_node_image: str
    gateway_api: str  # Gateway API release whose CRDs install.sh applies if the cluster has none
    gateway_api_version: str  # apiVersion of the waypoint Gateway
    authz_api_version: str  # apiVersion of AuthorizationPolicy
    waypoint_binding: Literal["for-service-account", "use-waypoint"]
    geneve: bool  # the node tunnels istioin/istioout/pistioin/pistioout exist (1.18's redirection)
    samples: dict[str, SampleImage] = field(default_factory=dict)

    def source_url(self, path: str) -> str:
        return f"istio/istio@{self.istio}:{path}"


WAYPOINT_CLASS = "istio-waypoint"
WAYPOINT_LISTENER: dict[str, Any] = {"name": "mesh", "port": 15008, "protocol": "HBONE"}
ANNOTATION_FOR_SA = "istio.io/for-service-account"
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"
# labels istiod puts on the Deployment it makes for a Gateway (1.18 and current spelling)
GATEWAY_NAME_LABELS = ("gateway.networking.k8s.io/gateway-name", "istio.io/gateway-name")

_SLEEP = ("/bin/sleep", "infinity")

RELEASES: dict[str, Release] = {
    "istio-1.18": Release(
        datapath="istio-1.18", istio="1.18.2", istio_commit="0183f2886bc078e8df4d6bbd21fa452a3a23481d",
        kubernetes="1.27", kind_node_image="kindest/node:v1.27.3", gateway_api="v0.6.2",
        gateway_api_version="gateway.networking.k8s.io/v1beta1", authz_api_version="security.istio.io/v1beta1",
        waypoint_binding="for-service-account", geneve=True,
        samples={
            "sleep": SampleImage("curlimages/curl", "samples/sleep/sleep.yaml", _SLEEP),
            # the sample's own command, with the topology's port instead of its 8080
            "httpbin": SampleImage("docker.io/kong/httpbin", "samples/httpbin/httpbin.yaml",
                                   ("pipenv", "run", "gunicorn", "-b", "0.0.0.0:{port}", "httpbin:app", "-k", "gevent"),
                                   env=(("WORKON_HOME", "/tmp"),)),
            "helloworld": SampleImage("docker.io/istio/examples-helloworld-{version}", "samples/helloworld/helloworld.yaml",
                                      fixed_port=5000),
        }),
    "inpod": Release(
        datapath="inpod", istio="1.30.3", istio_commit="56df41f63e513f834c9a3af33d8aed82d1d961f2",
        kubernetes="1.33", kind_node_image="kindest/node:v1.33.1", gateway_api="v1.3.0",
        gateway_api_version="gateway.networking.k8s.io/v1", authz_api_version="security.istio.io/v1",
        waypoint_binding="use-waypoint", geneve=False,
        samples={
            "sleep": SampleImage("curlimages/curl:8.16.0", "samples/sleep/sleep.yaml", _SLEEP),
            # go-httpbin listens on $PORT (the sample leaves it at 8080)
            "httpbin": SampleImage("docker.io/mccutchen/go-httpbin:v2.15.0", "samples/httpbin/httpbin.yaml",
                                   env=(("PORT", "{port}"),)),
            "helloworld": SampleImage("docker.io/istio/examples-helloworld-{version}:1.0",
                                      "samples/helloworld/helloworld.yaml", fixed_port=5000),
        }),
}
DATAPATHS = tuple(RELEASES)


def choose(datapath: str | None, topo: Any = None) -> Release:
    """The release of ``datapath``; without one, the topology's ``datapath`` key once it exists
    (issue 19), else the default. KeyError names the choices."""
    name = datapath or getattr(topo, "datapath", None) or DEFAULT_DATAPATH
    try:
        return RELEASES[name]
    except KeyError:
        raise KeyError(f"datapath {name!r}: use one of {', '.join(DATAPATHS)}") from None
