"""`netlab export k8s` (issue 22), without network and without a cluster.

For every shipped topology and both datapaths: every Kubernetes object validates (strict) against
the schema of a named Kubernetes release with the kubernetes-validate package, and every Istio
object against the project's typed schema of its CRD at the pinned release (tests/crd_expect.py).
Then what the objects say: pods on their nodes, the release's sample images, waypoints in that
release's form, policies with the lab's semantics, the kind file's node names, and the scripts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from netlab.errors import TopologyError
from netlab.export import DATAPATHS, export_k8s
from netlab.export.releases import PLACEHOLDER_IMAGE, RELEASES
from netlab.topology.load import load_topology, topologies_dir
from tests.crd_expect import SCHEMAS

NETLAB = str(Path(sys.executable).with_name("netlab"))
SHIPPED = sorted(p.stem for p in topologies_dir().glob("*.yaml"))
POLICIES = """\
policies:
  - {name: deny-foo, namespace: bar, action: DENY, from: ["ns/foo"]}
  - {name: allow-some, namespace: bar, from: ["spiffe://cluster.local/ns/baz/sa/client", "cluster.local/ns/qux/sa/x", "*"], to_ports: [80]}
  - {name: allow-all, namespace: foo}
"""


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _export(topology: str | Path, datapath: str, out: Path) -> dict[str, list[dict[str, Any]]]:
    export_k8s(topology, out, datapath)
    return {"core": _docs(out / "k8s.yaml"), "istio": _docs(out / "istio.yaml"), "kind": _docs(out / "kind.yaml")}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exporting (and validating) must need no network: any connect fails the test."""
    def refuse(self: socket.socket, *a: Any) -> None:
        raise AssertionError(f"network use during export: connect{a}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _validate(objs: dict[str, list[dict[str, Any]]], datapath: str) -> None:
    rel = RELEASES[datapath]
    for o in objs["core"]:
        got = kubernetes_validate.validate(o, rel.kubernetes, strict=True)
        assert got == rel.kubernetes  # the schema of exactly that release was used
    for o in objs["istio"]:
        schema = SCHEMAS[datapath][(o["apiVersion"], o["kind"])]  # KeyError: an Istio kind without a schema
        jsonschema.Draft202012Validator(schema).validate(o)


@pytest.mark.parametrize("datapath", DATAPATHS)
@pytest.mark.parametrize("topology", SHIPPED)
def test_every_object_of_every_shipped_topology_validates(topology: str, datapath: str, tmp_path: Path) -> None:
    topo = load_topology(topology)
    objs = _export(topology, datapath, tmp_path)
    _validate(objs, datapath)
    rel = RELEASES[datapath]
    deps = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in objs["core"] if d["kind"] == "Deployment"}
    assert set(deps) == {(p.namespace, p.name) for p in topo.pods}
    for p in topo.pods:
        spec = deps[(p.namespace, p.name)]["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"kubernetes.io/hostname": p.node}
        image = spec["containers"][0]["image"]
        want = PLACEHOLDER_IMAGE if p.command else rel.samples[p.app_name].image.replace("{version}", p.version)
        assert image == want
    assert {ns["metadata"]["name"]: ns["metadata"].get("labels", {}) for ns in objs["core"] if ns["kind"] == "Namespace"} \
        .keys() == topo.namespaces.keys()
    workers = [n for n in objs["kind"][0]["nodes"] if n["role"] == "worker"]
    assert [w["labels"]["kubernetes.io/hostname"] for w in workers] == [n.name for n in topo.nodes]
    for script in ("install.sh", "check.sh"):
        assert os.access(tmp_path / script, os.X_OK)
        r = subprocess.run(["bash", "-n", str(tmp_path / script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert f"ISTIO_VERSION={rel.istio}" in (tmp_path / "install.sh").read_text()
    assert "--set profile=ambient" in (tmp_path / "install.sh").read_text()


def test_the_validators_are_not_vacuous(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text((topologies_dir() / "sidecar-to-ambient.yaml").read_text() + POLICIES.replace("bar", "bar-1"))
    objs = _export(f, "istio-1.18", tmp_path / "out")
    dep = next(o for o in objs["core"] if o["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["nodeSelektor"] = {}  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.27", strict=True)
    pol = next(o for o in objs["istio"] if o["kind"] == "AuthorizationPolicy" and o["spec"]["rules"][0].get("to"))
    pol["spec"]["rules"][0]["to"][0]["operation"]["ports"] = [80]  # Istio's ports are strings
    gw = next(o for o in objs["istio"] if o["kind"] == "Gateway")
    gw["spec"]["listeners"][0]["port"] = 0
    for o in (pol, gw):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator(SCHEMAS["istio-1.18"][(o["apiVersion"], o["kind"])]).validate(o)


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_policies_become_authorization_policies_with_the_labs_semantics(datapath: str, tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text((topologies_dir() / "ambient-to-ambient.yaml").read_text() + POLICIES)
    objs = _export(f, datapath, tmp_path / "out")
    _validate(objs, datapath)
    pols = {o["metadata"]["name"]: o for o in objs["istio"] if o["kind"] == "AuthorizationPolicy"}
    assert {p["apiVersion"] for p in pols.values()} == {RELEASES[datapath].authz_api_version}
    assert pols["deny-foo"]["spec"] == {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["foo"]}}]}]}
    assert pols["allow-some"]["spec"] == {"action": "ALLOW", "rules": [{
        "from": [{"source": {"principals": ["cluster.local/ns/baz/sa/client", "cluster.local/ns/qux/sa/x", "*"]}}],
        "to": [{"operation": {"ports": ["80"]}}]}]}
    assert pols["allow-all"]["spec"] == {"action": "ALLOW", "rules": [{}]}  # matches everything, as in the lab
    assert "selector" not in pols["deny-foo"]["spec"]  # namespace-wide


@pytest.mark.parametrize("scoped", [False, True])
def test_waypoints_in_the_form_each_release_expects(scoped: bool, tmp_path: Path) -> None:
    text = (topologies_dir() / "sidecar-to-ambient.yaml").read_text()
    if scoped:
        text = text.replace("  - {namespace: bar-2, node: node-c}", "  - {namespace: bar-2, node: node-c, serviceAccount: helloworld}")
    f = tmp_path / "t.yaml"
    f.write_text(text)
    old = _export(f, "istio-1.18", tmp_path / "old")
    gw = next(o for o in old["istio"] if o["kind"] == "Gateway")
    assert gw["apiVersion"] == "gateway.networking.k8s.io/v1beta1" and gw["spec"]["gatewayClassName"] == "istio-waypoint"
    assert gw["metadata"].get("annotations", {}) == ({"istio.io/for-service-account": "helloworld"} if scoped else {})
    assert not any("istio.io/use-waypoint" in (o["metadata"].get("labels") or {}) for o in old["core"])
    cur = _export(f, "inpod", tmp_path / "cur")
    gw = next(o for o in cur["istio"] if o["kind"] == "Gateway")
    assert gw["apiVersion"] == "gateway.networking.k8s.io/v1" and gw["spec"] == {
        "gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
    bound = {(o["kind"], o["metadata"]["name"]) for o in cur["core"]
             if (o["metadata"].get("labels") or {}).get("istio.io/use-waypoint") == "waypoint"}
    assert bound == ({("Service", "helloworld")} if scoped else {("Namespace", "bar-2")})
    # istiod makes the waypoint's Deployment; install.sh pins it to the topology's node
    assert "pin_waypoint bar-2 waypoint node-c" in (tmp_path / "old" / "install.sh").read_text()


def test_own_programs_run_the_placeholder_image_with_their_command_as_the_pods_user(tmp_path: Path) -> None:
    objs = _export("own-programs", "istio-1.18", tmp_path)
    web = next(o for o in objs["core"] if o["kind"] == "Deployment" and o["metadata"]["name"] == "web")
    spec = web["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["image"] == PLACEHOLDER_IMAGE and c["command"] == ["python3", "-m", "http.server", "8080"]
    assert c["securityContext"]["runAsUser"] == 65534 and c["readinessProbe"]["httpGet"] == {"path": "/", "port": 8080}
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in spec["securityContext"]["sysctls"]
    assert (tmp_path / "program-image" / "Dockerfile").is_file()
    assert "kind load docker-image" in (tmp_path / "install.sh").read_text()


def test_check_sh_prints_a_tcpdump_per_packet_hop_and_says_which_hops_inpod_lacks(tmp_path: Path) -> None:
    _export("ambient-to-sidecar", "istio-1.18", tmp_path / "old")
    _export("ambient-to-sidecar", "inpod", tmp_path / "cur")
    s1 = load_topology("ambient-to-sidecar").paths[0]
    packets = [h for h in s1.hops if h.iface]
    old = (tmp_path / "old" / "check.sh").read_text()
    assert old.count("tcpdump -ni ") == len(packets)
    assert "kubectl exec -n foo" in old and "curl" in old and "http://httpbin.bar:8000/headers" in old
    assert "tcpdump -ni istioout -Q out" in old and "$(veth_of node-a $(pod_ip foo sleep))" in old
    cur = (tmp_path / "cur" / "check.sh").read_text()
    assert "tcpdump -ni istioout" not in cur and cur.count("no such hop in inpod") == 4  # (3), (4), and (6) twice


def test_the_export_cli_needs_no_root_and_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    r = subprocess.run([NETLAB, "export", "k8s", "ambient-to-sidecar", "-o", str(tmp_path / "a"), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and '"datapath": "istio-1.18"' in r.stdout, r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text((topologies_dir() / "two-nodes.yaml").read_text().replace("app: httpbin}", "app: sink}", 1))
    r = subprocess.run([NETLAB, "export", "k8s", str(bad), "-o", str(tmp_path / "b")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "pods[0]" in r.stderr and "sink" in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()  # nothing written
    r = subprocess.run([NETLAB, "export", "k8s", "--help"], capture_output=True, text=True, timeout=60)
    assert "--datapath" in r.stdout and "check.sh" in r.stdout and "kubernetes.io/hostname" in r.stdout


def test_a_hostile_hop_cannot_inject_into_check_sh(tmp_path: Path) -> None:
    text = (topologies_dir() / "ambient-to-sidecar.yaml").read_text().replace(
        'at: "node:node-a", iface: "istioout"', 'at: "node:$(touch${IFS}/tmp/pwned)", iface: "istioout"')
    f = tmp_path / "t.yaml"
    f.write_text(text)
    with pytest.raises(TopologyError, match=r"paths\[0\]\.hops\[2\]\.at"):
        export_k8s(f, tmp_path / "out")


def test_writing_replaces_a_planted_symlink_instead_of_following_it(tmp_path: Path) -> None:
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_text("keep")
    (out / "k8s.yaml").symlink_to(victim)
    export_k8s("ambient-to-sidecar", out)
    assert victim.read_text() == "keep" and not (out / "k8s.yaml").is_symlink()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
