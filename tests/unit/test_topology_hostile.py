"""Hostile topology files and names (issue 17, items 6-10 and 12d-e): each is refused before
anything is made with one line on stderr that names the file and the field, exit status 2, and
no traceback; address allocation costs per object made, never per address of a range."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
from cryptography import x509

from netlab import cli, state
from netlab.mesh.bootstrap import MeshContext, prepare
from netlab.mesh.ca import LabCA, uri_sans
from netlab.plan.build import build_plan
from netlab.topology.load import load_topology
from tests.unit.test_topology import GOOD

AMBIENT = GOOD  # two nodes, one ambient namespace, one pod


def plan_cli(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    f = tmp_path / "topo.yaml"
    f.write_text(text)
    rc = cli.main(["plan", str(f), *extra])
    captured = capsys.readouterr()
    return rc, captured.err


def assert_one_line(rc: int, err: str, *expect: str, file: str | None = "topo.yaml") -> str:
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1, err
    if file:
        assert file in lines[0], lines[0]
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


# ---- item 7 / 8 / 9 / 10: names -------------------------------------------------------------------

BAD_NAMES = {
    "pod name with a trailing newline": (AMBIENT.replace("{name: sleep,", '{name: "sleep\\n",'), "pods[0].name", "'sleep\\n'"),
    "namespace with a trailing newline": (AMBIENT.replace("  foo: {", '  "foo\\n": {').replace("namespace: foo", 'namespace: "foo\\n"'),
                                          "namespace", "'foo\\n'"),
    "node name with a trailing newline": (AMBIENT.replace("- name: node-b", '- name: "node-b\\n"'), "nodes[1].name", "'node-b\\n'"),
    "empty pod name": (AMBIENT.replace("{name: sleep,", "{name: '',"), "pods[0].name", "empty"),
    "300-character waypoint name": (AMBIENT + "waypoints: [{namespace: foo, node: node-a, name: " + "w" * 300 + "}]\n",
                                    "waypoints[0].name", "300 characters"),
    "waypoint name with a slash": (AMBIENT + "waypoints: [{namespace: foo, node: node-a, name: a/b}]\n",
                                   "waypoints[0].name", "'a/b'"),
    "waypoint name with a newline": (AMBIENT + 'waypoints: [{namespace: foo, node: node-a, name: "w\\n"}]\n',
                                     "waypoints[0].name"),
    "unicode serviceAccount": (AMBIENT.replace("node: node-a}", "node: node-a, serviceAccount: sérvice}"),
                               "pods[0].serviceAccount", "DNS-1123 subdomain"),
    "300-character serviceAccount": (AMBIENT.replace("node: node-a}", "node: node-a, serviceAccount: " + "s" * 300 + "}"),
                                     "pods[0].serviceAccount", "300 characters"),
    "serviceAccount x/y": (AMBIENT.replace("node: node-a}", "node: node-a, serviceAccount: x/y}"),
                           "pods[0].serviceAccount", "'x/y'"),
    "serviceAccount x_y": (AMBIENT.replace("node: node-a}", "node: node-a, serviceAccount: x_y}"),
                           "pods[0].serviceAccount", "'x_y'"),
    "serviceAccount with a newline": (AMBIENT.replace("node: node-a}", 'node: node-a, serviceAccount: "sa\\n"}'),
                                      "pods[0].serviceAccount"),
    "waypoint serviceAccount x/y": (AMBIENT + "waypoints: [{namespace: foo, node: node-a, serviceAccount: x/y}]\n",
                                    "waypoints[0].serviceAccount"),
    "identity too long for a certificate directory": (
        AMBIENT.replace("foo", "f" * 63).replace("node: node-a}", "node: node-a, serviceAccount: " + "s" * 200 + "}"),
        "pods[0]", "certificate directory"),
    "namespace upper case": (AMBIENT.replace("  foo: {", "  Foo: {"), "namespaces", "'Foo'"),
    "topology name with a newline": (AMBIENT.replace("name: t\n", 'name: "t\\n"\n', 1), "name", "'t\\n'"),
    "policy principal with a bad service account": (
        AMBIENT + "policies: [{name: p, namespace: foo, from: ['cluster.local/ns/foo/sa/x_y']}]\n",
        "policies[0].from", "service account"),
    "hop 'at' with a trailing newline": (
        AMBIENT + "paths: [{name: p, from: foo/sleep, to: 'x:80', hops: [{n: '1', at: \"pod:foo/sleep\\n\", "
                  "iface: eth0, dir: out}]}]\n", "paths[0].hops[0]", "at"),
}


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_bad_name_is_one_line_naming_file_and_field(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, *expect = BAD_NAMES[case]
    rc, err = plan_cli(tmp_path, text, capsys)
    assert_one_line(rc, err, *expect)


@pytest.mark.parametrize("name", ["", "x\n", "X", "a" * 41, "-a", "a_b", "ä"])
def test_bad_lab_name_option_is_exit_2(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--name ''`` is an error, never silently the topology's name."""
    rc, err = plan_cli(tmp_path, AMBIENT, capsys, f"--name={name}")
    assert_one_line(rc, err, "lab name", file=None)


def test_names_are_full_match_and_never_empty() -> None:
    from netlab import names

    for check in (names.check_label, names.check_subdomain, names.check_lab_name):
        for bad in ("", "ok\n", "\nok", "ok\r", "o k", "ok/x", "ok\x00"):
            with pytest.raises(names.BadName):
                check(bad, "x")
    assert names.check_subdomain("a.b-c", "sa") == "a.b-c"
    with pytest.raises(names.BadName):
        names.check_label("a.b", "ns")  # a namespace is a DNS-1123 label: no dots
    with pytest.raises(names.BadName):
        names.check_label("a" * 64, "ns")
    assert names.check_subdomain("a" * 253, "sa")


def test_ledger_lab_name_is_the_shared_full_match_rule() -> None:
    """kernel/ledger.py had its own pattern (anything up to 64 characters, with ``$``); the lab's
    state directory is netlab.state's now."""
    from netlab import names

    assert names.LAB_NAME_RE.match("ok") and not names.LAB_NAME_RE.match("ok\n")
    for bad in ("ok\n", "Upper", "a" * 41, "a_b"):
        with pytest.raises(ValueError):
            state.lab_dir(bad)


# ---- item 10: one identity, one certificate directory ---------------------------------------------

def test_different_identities_never_share_a_certificate(tmp_path: Path) -> None:
    """``x/y`` and ``x_y`` used to map to one directory: the second pod was served the first's SAN."""
    ca = LabCA.create(tmp_path / "ca")
    idents = ["spiffe://cluster.local/ns/x/sa/y/z", "spiffe://cluster.local/ns/x/sa/y_z",
              "spiffe://cluster.local/ns/x_sa/y", "spiffe://cluster.local/ns/x/sa/y%5Fz"]
    certs = [ca.issue(i)[0] for i in idents]
    assert len({c.parent for c in certs}) == len(idents)
    for ident, cert in zip(idents, certs, strict=True):
        assert uri_sans(cert) == [ident]
    assert len({ca.leaf_dir(i) for i in idents}) == len(idents)


def test_each_pod_is_served_its_own_identity(tmp_path: Path) -> None:
    """Two pods with different service accounts: ``up`` issues two leaves, and a proxy that asks
    for each identity (MeshContext.cert_for, the path LabCA.leaf_dir names) gets that identity's."""
    f = tmp_path / "t.yaml"
    f.write_text(AMBIENT + "  - {name: other, namespace: foo, node: node-b, serviceAccount: x.y}\n"
                 "  - {name: third, namespace: foo, node: node-b, serviceAccount: x-y}\n")
    sd = tmp_path / "state"
    sd.mkdir()
    reg = prepare(build_plan(load_topology(f), lab="hx-id"), sd)
    ctx = MeshContext.load(sd)
    seen = {}
    for w in reg.workloads.values():
        cert, _ = ctx.cert_for(w.identity)
        assert uri_sans(cert) == [w.identity]
        seen[w.identity] = cert
    assert {"spiffe://cluster.local/ns/foo/sa/x.y", "spiffe://cluster.local/ns/foo/sa/x-y",
            "spiffe://cluster.local/ns/foo/sa/default"} <= set(seen)
    assert len(set(seen.values())) == len(seen)
    leaves = [x509.load_pem_x509_certificate(c.read_bytes()) for c in seen.values()]
    assert len({leaf.public_key().public_numbers() for leaf in leaves}) == len(leaves)  # type: ignore[union-attr]


# ---- item 6: address ranges -----------------------------------------------------------------------

def _with_cidr(cidr: str, node: int = 0) -> str:
    n = ["node-a", "node-b"][node]
    return AMBIENT.replace(f"- name: {n}", f"- {{name: {n}, podCidr: {cidr}}}")


BAD_RANGES = {
    "pod CIDR over istioin's link net": (_with_cidr("192.168.126.0/25"), "nodes[0].podCidr", "tunnel link net"),
    "pod CIDR over istioout's link net": (_with_cidr("192.168.127.0/26", 1), "nodes[1].podCidr", "istioout"),
    "loopback pod CIDR": (_with_cidr("127.0.0.0/24"), "nodes[0].podCidr", "loopback"),
    "multicast pod CIDR": (_with_cidr("224.1.0.0/24"), "nodes[0].podCidr", "multicast"),
    "link-local pod CIDR": (_with_cidr("169.254.1.0/24"), "nodes[0].podCidr", "link-local"),
    "pod CIDR in 0/8": (_with_cidr("0.0.1.0/24"), "nodes[0].podCidr", "this network"),
    "pod CIDR over the default pod CIDR of another node": (_with_cidr("10.0.0.0/16"), "nodes[0].podCidr",
                                                           "nodes[1].podCidr (default) 10.0.2.0/24"),
    "fabric over the service range": (AMBIENT + "network: {fabric: 10.96.0.0/24}\n", "network.fabric",
                                      "network.serviceCidr"),
    "fabric over a pod CIDR": (AMBIENT + "network: {fabric: 10.0.0.0/16}\n", "network.fabric", "nodes[0].podCidr"),
    "service range over a tunnel link net": (AMBIENT + "network: {serviceCidr: 192.168.127.0/24}\n",
                                             "network.serviceCidr", "istioout"),
    "service range /1": (AMBIENT + "network: {serviceCidr: 128.0.0.0/1}\n", "network.serviceCidr", "reserved"),
    "loopback fabric": (AMBIENT + "network: {fabric: 127.0.0.0/16}\n", "network.fabric", "loopback"),
    "fabric /30 for 2 nodes (node b would be the broadcast address)": (
        AMBIENT + "network: {fabric: 172.172.0.0/30}\n", "network.fabric", "too small", "/29"),
    "fabric /31": (AMBIENT.replace("  - name: node-b\n", "") + "network: {fabric: 172.172.0.0/31}\n",
                   "network.fabric", "too small"),
}


@pytest.mark.parametrize("case", sorted(BAD_RANGES))
def test_overlapping_or_reserved_range_names_both_fields(case: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    text, *expect = BAD_RANGES[case]
    rc, err = plan_cli(tmp_path, text, capsys)
    assert_one_line(rc, err, *expect)


def test_fabric_just_big_enough_keeps_nodes_below_broadcast(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text(AMBIENT + "network: {fabric: 172.172.0.0/29}\n")
    p = build_plan(load_topology(f))
    assert [n.ip for n in p.nodes] == ["172.172.0.2", "172.172.0.3"]


@pytest.mark.parametrize("network", ["{serviceCidr: 11.0.0.0/8}", "{serviceCidr: 10.128.0.0/9, fabric: 172.16.0.0/12}",
                                     "{serviceCidr: 11.0.0.0/8, fabric: 12.0.0.0/6}"])
def test_huge_ranges_plan_in_time_and_memory_of_the_objects(network: str, tmp_path: Path) -> None:
    """A /8 service range took 20 s and 1.6 GB (every host address was listed)."""
    f = tmp_path / "t.yaml"
    f.write_text(_with_cidr("20.0.0.0/7") + f"network: {network}\n"
                 "services: [{name: a, namespace: foo, port: 80}, {name: b, namespace: foo, port: 80}]\n")
    topo = load_topology(f)
    tracemalloc.start()
    t0 = time.perf_counter()
    p = build_plan(topo)
    took = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert took < 1.0 and peak < 20 << 20, (took, peak)
    net = network.split("serviceCidr: ")[1].split("/")[0].split(".")
    assert [s.vip for s in p.services] == [f"{net[0]}.{net[1]}.0.10", f"{net[0]}.{net[1]}.0.11"]
    assert p.nodes[0].pod_cidr == "20.0.0.0/7" and p.nodes[0].host_ip == "20.0.0.1"


def test_service_vips_skip_the_taken_ones_and_stop_at_the_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "t.yaml"
    f.write_text(AMBIENT + "network: {serviceCidr: 10.96.0.0/28}\nservices:\n"
                 "  - {name: a, namespace: foo, port: 80}\n  - {name: b, namespace: foo, port: 80, clusterIP: 10.96.0.11}\n"
                 "  - {name: c, namespace: foo, port: 80}\n")
    assert [s.vip for s in build_plan(load_topology(f)).services] == ["10.96.0.10", "10.96.0.11", "10.96.0.12"]
    rc, err = plan_cli(tmp_path, AMBIENT + "network: {serviceCidr: 10.96.0.0/28}\nservices:\n"
                       + "".join(f"  - {{name: s{i}, namespace: foo, port: 80}}\n" for i in range(6)), capsys)
    assert_one_line(rc, err, "services[5]", "no address left")


# ---- item 9, 12d, 12e: the file itself ------------------------------------------------------------

HOSTILE_YAML = {
    "nested 3,000 deep": (AMBIENT + "x: " + "[" * 3000 + "]" * 3000 + "\n", "nest"),
    "nested 100 deep": (AMBIENT + "x: " + "[" * 100 + "]" * 100 + "\n", "x[0][0][0]", "deeper than 64"),
    "nested mapping keys": (AMBIENT + "? " + "[" * 100 + "]" * 100 + "\n: 1\n", "deeper than 64"),
    "5,000-digit port": (AMBIENT.replace("node: node-a}", "node: node-a, ports: [" + "1" * 5000 + "]}"),
                         "pods[0].ports[0]", "5000 characters"),
    "duplicate top-level key": (AMBIENT + "name: u\n", ":9:", "name: duplicate key (first at line 1)"),
    "duplicate nested key": (AMBIENT.replace("{name: sleep,", "{name: sleep, name: other,"),
                             ":8:", "pods[0].name: duplicate key (first at line 8)"),
    "duplicate namespace": (AMBIENT.replace("pods:", "  foo: {}\npods:"), ":7:", "namespaces.foo: duplicate key (first at line 6)"),
    "alias that contains itself": (AMBIENT + "x: &x [*x]\n", "x[0]", "contains it"),
    "billion laughs": (AMBIENT + "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
                       + "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 9)),
                       "aliases are expanded"),
    "a date that is not one": (AMBIENT + "description: 2001-13-45\n", "description", "month must be in 1..12"),
}


@pytest.mark.parametrize("fast", [True, False], ids=["libyaml", "pure"])
@pytest.mark.parametrize("case", sorted(HOSTILE_YAML))
def test_hostile_yaml_is_one_line_naming_file_and_field(case: str, fast: bool, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        from netlab.topology import yaml_input
    except ImportError:  # main before the fix: the one loader is yaml.safe_load
        if not fast:
            pytest.skip("no pure/libyaml choice before yaml_input existed")
        yaml_input = None  # type: ignore[assignment]
    if fast and yaml_input is not None and not yaml_input.FAST:
        pytest.skip("PyYAML without libyaml")
    if not fast:
        monkeypatch.setattr(yaml_input, "_Loader", yaml_input._PureLoader)  # type: ignore[union-attr]
    text, *expect = HOSTILE_YAML[case]
    rc, err = plan_cli(tmp_path, text, capsys)
    assert_one_line(rc, err, *expect)


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text(AMBIENT.replace("  - {name: sleep, namespace: foo, node: node-a}",
                                 "  - &p {name: sleep, namespace: foo, node: node-a}\n  - {<<: *p, name: other}"))
    assert [p.name for p in load_topology(f).pods] == ["sleep", "other"]


def test_both_loaders_read_the_shipped_topologies_alike() -> None:
    import yaml

    from netlab.topology import yaml_input
    from netlab.topology.load import topologies_dir

    for p in sorted(topologies_dir().glob("*.yaml")):
        text = p.read_text()
        assert yaml_input.load(text) == yaml_input.load(text, fast=False) == yaml.safe_load(text), p


def test_directory_as_topology_says_it_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for ref in (str(tmp_path), str(tmp_path / "d.yaml")):
        Path(ref).mkdir(exist_ok=True)
        assert cli.main(["plan", ref]) == 2
        line = assert_one_line(2, capsys.readouterr().err, ref, file=None)
        assert "is a directory" in line


def test_no_traceback_without_debug(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error (a bug) is one line and exit 1; ``--debug`` shows the traceback."""
    import netlab.plan.build

    def boom(*a: object, **kw: object) -> None:
        raise RecursionError("maximum recursion depth exceeded\nsecond line")

    monkeypatch.setattr(netlab.plan.build, "build_plan", boom)
    f = tmp_path / "t.yaml"
    f.write_text(AMBIENT)
    assert cli.main(["plan", str(f)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "RecursionError" in err and "--debug" in err
    with pytest.raises(RecursionError):
        cli.main(["plan", str(f), "--debug"])
    with pytest.raises(RecursionError):
        cli.main(["--debug", "plan", str(f)])
