"""The proxies against a hostile local user and hostile peers (issue 17: items 1, 3, 4, 5, 9, 12b).

One lab (``hxh``) with every kind of client on node-a (ambient, sidecar, plain) and a sidecar
and an ambient server on node-b, plus a service whose selector matches no pod. Attacks run as
another uid (``setpriv``/``nsenter -S``) or from inside a pod's netns, and every assertion is
about what really happened: bytes in a file, a process's credentials, fds held, time taken.
A second lab (item 5) is brought up under ``ulimit -n 1024`` and loaded with 2,000 connections.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.lab import Lab
from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.connlog import read_legs
from tests import loadgen as lg

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]

NETLAB = [sys.executable, "-m", "netlab.cli"]
NOBODY = 65534
TOPOLOGY = """\
name: hxh
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  amb: {labels: {istio.io/dataplane-mode: ambient}}
  sc: {labels: {istio-injection: enabled}}
  legacy: {}
  bar: {labels: {istio-injection: enabled}}
  bar-1: {labels: {istio.io/dataplane-mode: ambient}}
pods:
  - {name: sleep, namespace: amb, node: node-a, app: sleep, serviceAccount: sleep}
  - {name: sleep, namespace: sc, node: node-a, app: sleep, serviceAccount: sleep}
  - {name: sleep, namespace: legacy, node: node-a, app: sleep}
  - {name: httpbin, namespace: bar, node: node-b, app: httpbin, serviceAccount: httpbin, ports: [80]}
  - {name: httpbin, namespace: bar-1, node: node-b, app: httpbin, serviceAccount: httpbin, ports: [80]}
services:
  - {name: httpbin, namespace: bar, port: 8000, targetPort: 80, selector: {app: httpbin}}
  - {name: httpbin, namespace: bar-1, port: 8000, targetPort: 80, selector: {app: httpbin}}
  - {name: empty, namespace: bar-1, port: 8000, targetPort: 80, selector: {app: nothing-has-this}}
"""
SC_SLEEP = "sleep.sc-sidecar"
BAR_HTTPBIN = "httpbin.bar-sidecar"


run_dir, netlab_run_dir, _ = lg.lab_fixtures("hxh", {})  # a private NETLAB_RUN_DIR for this module


@pytest.fixture(scope="module")
def lab(run_dir: Path) -> Iterator[Lab]:
    f = run_dir / "hxh.yaml"
    f.write_text(TOPOLOGY)
    try:
        yield Lab.up(str(f), name="hxh", tunnel="userspace")
    finally:
        Lab.down_lab("hxh")


def procs(lab: Lab) -> dict[str, dict]:
    return lg.procs(lab.state_dir)


def as_uid(uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30)


def curl(lab: Lab, pod: str, url: str, timeout: float = 5) -> tuple[str, float]:
    t = time.monotonic()
    r = lab.exec_capture(pod, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(timeout), url],
                         timeout=timeout + 10)
    return r.stdout.strip(), time.monotonic() - t


def cap_lines(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k.startswith("Cap"):
            out[k] = int(v.strip(), 16)
    return out


# ---- item 1: nothing root writes into is writable by others -------------------------------------
def test_conn_dir_belongs_to_root_and_each_log_to_its_writer(lab: Lab) -> None:
    conn = lab.state_dir / "conn"
    st = os.lstat(conn)
    assert st.st_uid == 0 and st.st_mode & 0o7777 == 0o755, f"conn/ is {st.st_mode & 0o7777:o} uid {st.st_uid}"
    want = {p.name: p.uid for p in lab.plan.processes if p.kind in ("ztunnel", "sidecar", "waypoint")}
    have = {f.name: os.lstat(f).st_uid for f in conn.iterdir()}
    assert have == {f"{n}{sfx}": uid for n, uid in want.items() for sfx in (".jsonl", ".jsonl.1")}
    assert {have[f"{SC_SLEEP}.jsonl"], have["ztunnel-node-a.jsonl"]} == {1337, 0}
    # another user can plant nothing there: no symlink for root (or a sidecar) to append through
    target = lab.state_dir / "root-only-secret"
    target.write_text("secret\n")
    os.chmod(target, 0o600)
    r = as_uid(NOBODY, "ln", "-s", str(target), str(conn / "ztunnel-node-z.jsonl"))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_uid(NOBODY, "sh", "-c", f"echo '{{}}' > {conn / 'forged.jsonl'}")
    assert r.returncode != 0 and not (conn / "forged.jsonl").exists()
    # and traffic lands in the prepared files, nowhere else
    assert curl(lab, "amb/sleep", "http://httpbin.bar:8000/get")[0] == "200"
    deadline = time.monotonic() + 5
    while not read_legs(conn / "ztunnel-node-a.jsonl") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_legs(conn / "ztunnel-node-a.jsonl")
    assert target.read_text() == "secret\n"
    assert {f.name for f in conn.iterdir()} == set(have)


# ---- items 1 and 9: readers skip what is not a leg, and say so --------------------------------
def test_garbage_in_a_connection_log_is_skipped_and_counted_by_logs_and_trace(lab: Lab) -> None:
    sidecar_log = lab.state_dir / "conn" / f"{SC_SLEEP}.jsonl"  # what a (compromised) sidecar can write
    with open(sidecar_log, "a") as f:
        f.write('{not json\n[1, 2]\n{"component": 5, "listener": "x", "src": "a", "orig_dst": "b"}\n')
    assert curl(lab, "amb/sleep", "http://httpbin.bar:8000/get")[0] == "200"
    r = subprocess.run([*NETLAB, "logs", "--lab", "hxh", "--conn"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "skipped 3 lines" in r.stderr, r.stderr
    assert "ztunnel-node-a" in r.stdout

    stop = threading.Event()

    def scribble() -> None:  # keeps adding garbage while the trace follows the logs
        while not stop.is_set():
            with open(sidecar_log, "a") as f:
                f.write('"just a string"\n{"src": 1}\n')
            time.sleep(0.002)

    t = threading.Thread(target=scribble)
    t.start()
    try:
        r = subprocess.run([*NETLAB, "trace", "--lab", "hxh", "--from", "amb/sleep", "--to", "httpbin.bar:8000",
                            "--json"], capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        t.join()
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    res = json.loads(r.stdout)
    assert res["status"] == 200
    assert any(h["kind"] == "proxy" for h in res["hops"]), "the trace found no proxy leg"
    assert any("that are not connection legs" in n and n.startswith("skipped ") for n in res["notes"]), res["notes"]


# ---- item 3: the sidecar has no capability and sees only its own key --------------------------
def test_sidecar_has_no_capabilities_and_reads_only_its_own_key(lab: Lab) -> None:
    p = procs(lab)
    me, other = p[SC_SLEEP]["pid"], p[BAR_HTTPBIN]["pid"]
    for pid in (me, other):
        caps = cap_lines(pid)
        assert caps == dict.fromkeys(caps, 0) and len(caps) == 5, f"pid {pid}: {caps}"
    ctx = MeshContext.for_lab(lab.name)
    own_cert, own_key = ctx.cert_for("spiffe://cluster.local/ns/sc/sa/sleep")
    _, other_key = ctx.cert_for("spiffe://cluster.local/ns/bar/sa/httpbin")
    ca_key = ctx.ca_cert.parent / "ca-key.pem"
    other_lab_like = lab.state_dir.parent / "some-other-lab" / "key.pem"
    other_lab_like.parent.mkdir(exist_ok=True)
    other_lab_like.write_text("another lab's sidecar key\n")
    os.chown(other_lab_like, 1337, 1337)  # as every sidecar key of every lab is
    os.chmod(other_lab_like, 0o600)

    def cat_as_sidecar(path: Path) -> subprocess.CompletedProcess[str]:
        """``cat`` with the sidecar's credentials, in the sidecar's mount namespace."""
        return subprocess.run(["nsenter", "-t", str(me), "-m", "-S", "1337", "-G", "1337", "cat", str(path)],
                              capture_output=True, text=True, timeout=30)

    assert cat_as_sidecar(own_key).stdout == own_key.read_text()  # it still has what it needs
    assert cat_as_sidecar(own_cert).returncode == 0
    for secret in (Path("/etc/shadow"), ca_key, other_key, other_lab_like):
        r = cat_as_sidecar(secret)
        assert r.returncode != 0 and r.stdout == "", f"the sidecar read {secret}"
    # from outside, another uid-1337 process cannot go through the sidecar's /proc entry either
    r = as_uid(1337, "cat", f"/proc/{me}/root{own_key}")
    assert r.returncode != 0 and "BEGIN" not in r.stdout
    r = as_uid(1337, "cat", f"/proc/{me}/environ")
    assert r.returncode != 0


# ---- item 4: a self-call on ztunnel's 15006 is refused at once ---------------------------------
def test_connections_to_ztunnels_own_15006_are_refused_and_pin_no_fds(lab: Lab) -> None:
    zt_ip = next(x.ip for x in lab.plan.pods if x.mode == "ztunnel" and x.node == "node-a")
    zt = procs(lab)["ztunnel-node-a"]["pid"]
    idle = lg.fd_count(zt)
    legacy = lab.pod("legacy/sleep").netns

    def flood() -> list[socket.socket]:
        socks = []
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((zt_ip, 15006))
            socks.append(s)
        return socks

    socks = lg.run_in_netns(legacy, flood)
    try:
        time.sleep(1.0)  # before the fix: 2 fds per connection held for the 10 s connect timeout
        assert lg.fd_count(zt) < idle + 20, f"ztunnel holds {lg.fd_count(zt) - idle} more fds than idle"
    finally:
        for s in socks:
            s.close()
    legs = [g for g in read_legs(lab.state_dir / "conn" / "ztunnel-node-a.jsonl")
            if g["listener"].startswith("inbound-plaintext") and g["orig_dst"] == f"{zt_ip}:15006"]
    assert legs and all(g["outcome"] == "refused" and g["extra"]["reason"] == "SelfCall" for g in legs)
    assert curl(lab, "legacy/sleep", "http://httpbin.bar-1:8000/get")[0] == "200"  # 15006 still serves


# ---- item 12b: a service without endpoints fails at once ----------------------------------------
def test_service_without_endpoints_fails_at_once_with_no_healthy_upstream(lab: Lab) -> None:
    code, took = curl(lab, "amb/sleep", "http://empty.bar-1:8000/get")
    assert code == "000" and took < 2.0, f"curl got {code} after {took:.1f} s"
    legs = [g for g in read_legs(lab.state_dir / "conn" / "ztunnel-node-a.jsonl") if g["orig_dst"].endswith(":8000")
            and g.get("extra", {}).get("reason") == "NoHealthyUpstream"]
    assert legs and legs[-1]["outcome"] == "no_healthy_upstream"
    log = (lab.state_dir / "logs" / "ztunnel-node-a.log").read_text()
    assert "no healthy upstream" in log


# ---- item 5: proxies do not inherit the caller's fd limit ---------------------------------------
def _can_raise_hard_limits() -> bool:
    """CAP_SYS_RESOURCE (bit 24): without it, not even root can raise a hard limit again."""
    bnd = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("CapEff:"))
    return bool(int(bnd.split()[1], 16) & (1 << 24))


@pytest.mark.slow
@pytest.mark.parametrize("ulimit", ["-Sn", "-n"])
def test_up_under_ulimit_1024_then_2000_concurrent_connections_through_s1(run_dir: Path, ulimit: str) -> None:
    """``ulimit -Sn 1024``: every supervised process (proxies, apps, userspace Geneve) starts with
    its soft limit at its hard limit. ``ulimit -n 1024`` lowers the hard limit too, which only a
    root with CAP_SYS_RESOURCE can raise again (``spawn`` does, for every child)."""
    if ulimit == "-n" and not _can_raise_hard_limits():
        pytest.skip("root has no CAP_SYS_RESOURCE here (a container): a hard limit of 1024 cannot be raised")
    name = f"hxh-nofile{ulimit.lower().replace('-', '')}"
    topo = lg.seed_topology_file("S1", name, run_dir)
    env = dict(os.environ, NETLAB_RUN_DIR=str(run_dir / "run"))
    up = subprocess.run(["bash", "-c", f'ulimit {ulimit} 1024 && exec "$@"', "up", *NETLAB, "up", str(topo),
                         "--name", name, "--tunnel", "userspace"], capture_output=True, text=True, timeout=180, env=env)
    try:
        assert up.returncode == 0, up.stderr
        lab = Lab.attach(name)
        for n, e in lg.procs(lab.state_dir).items():
            limits = Path(f"/proc/{e['pid']}/limits").read_text()
            soft, hard = next(ln for ln in limits.splitlines() if ln.startswith("Max open files")).split()[3:5]
            assert int(soft) == int(hard) > 2 * 2000, f"{n}: fd limit soft {soft} hard {hard}"
        netns, dst, _ = lg.path_target(lab, "S1")
        res = lg.run_load(netns, dst, 2000, 1024)
        print(f"\n[ulimit {ulimit} 1024, 2000 through S1] {res.summary()}")
        assert not res.errors, f"{len(res.errors)} of 2000 failed: " + "; ".join(
            f"#{e.idx} {e.outcome} {e.detail}" for e in res.errors[:5])
    finally:
        Lab.down_lab(name)
