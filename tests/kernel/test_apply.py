"""apply / destroy against the real kernel (namespaces prefixed ``hk-``), plus parser unit tests."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from netlab import istio
from netlab import netns as ns
from netlab.kernel import ledger, rtnl
from netlab.kernel.apply import ApplyError, apply, sysctl_path
from netlab.kernel.destroy import destroy, lab_is_up, list_labs
from netlab.plan.ambient import pod_uid
from netlab.plan.iptspec import IptSpecError, parse_spec
from netlab.plan.types import IpSetEntry, IptRule, Route, Sysctl
from netlab.state import StateDir
from tests import sample_plans as sample

kernel = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
REPO = Path(__file__).resolve().parents[2]


def sh(cmd: str, check: bool = True) -> str:
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and p.returncode:
        raise AssertionError(f"{cmd}: rc={p.returncode} {p.stderr}")
    return p.stdout


def icmp_ping(netns: str, dst: str, timeout: float = 2.0) -> bool:
    """One ICMP echo from inside ``netns`` (this machine has no ping binary): a raw socket made
    by a thread inside the netns, so the packet leaves from there."""
    ident = (os.getpid() + threading.get_native_id()) & 0xFFFF
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"netlab-hk!"
    csum = sum(struct.unpack(f"!{len(body) // 2}H", body + b"\0" * (len(body) % 2)))
    csum = (csum >> 16) + (csum & 0xFFFF)
    csum = ~(csum + (csum >> 16)) & 0xFFFF
    pkt = body[:2] + struct.pack("!H", csum) + body[4:]
    with ns.in_netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with s:
        s.sendto(pkt, (dst, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data, (src, _) = s.recvfrom(2048)
            except TimeoutError:
                return False
            ihl = (data[0] & 0xF) * 4
            typ, _, _, rid, _ = struct.unpack_from("!BBHHH", data, ihl)
            if typ == 0 and rid == ident and src == dst:
                return True
    return False


def lingering(prefix: str) -> list[str]:
    """What `ip netns list` would show with ``prefix``."""
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(prefix))
    except FileNotFoundError:
        return []


def saved_rules(netns: str, table: str) -> dict[str, list[str]]:
    rules: dict[str, list[str]] = defaultdict(list)
    for line in sh(f"ip netns exec {netns} iptables-legacy-save -t {table}").splitlines():
        if line.startswith("-A "):
            chain, spec = line[3:].split(" ", 1)
            rules[chain].append(spec)
    return rules


# ---- unit: no root ----

def test_parse_spec_negations_and_options():
    p = parse_spec("! -s 10.0.1.2/32 -i veth1 -p tcp -m tcp ! --dport 15008 -m owner ! --uid-owner 1337 "
                   "-j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff")
    assert p.src == "!10.0.1.2/32" and p.in_iface == "veth1" and p.proto == "tcp"
    assert [(m.name, [(o.name, o.args, o.neg) for o in m.opts]) for m in p.matches] == [
        ("tcp", [("dport", ["15008"], True)]), ("owner", [("uid-owner", ["1337"], True)])]
    assert p.target.name == "TPROXY"
    assert [(o.name, o.args) for o in p.target.opts] == [
        ("on-port", ["15008"]), ("on-ip", ["127.0.0.1"]), ("tproxy-mark", ["0x400/0xfff"])]
    p = parse_spec("-m set --match-set ztunnel-pods-ips src -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220")
    assert p.matches[0].opts[0].args == ["ztunnel-pods-ips", "src"]
    assert [(o.name, o.args) for o in p.target.opts] == [("save-mark", []), ("nfmask", ["0x220"]), ("ctmask", ["0x220"])]
    # iptables' implicit protocol match
    assert parse_spec("-p tcp --dport 80 -j RETURN").matches[0].name == "tcp"
    for bad in ("-i x", "-j A -j B", "-i x ! -j RETURN", "--dport 1 -j RETURN"):
        with pytest.raises(IptSpecError):
            parse_spec(bad)


def test_describe_and_sysctl_path():
    r = Route("lab-node-a", "10.0.2.0/24", gateway="172.172.0.3")
    assert r.describe() == "route 10.0.2.0/24 via 172.172.0.3 in netns lab-node-a"
    assert sysctl_path("net.ipv4.conf.eth0.100.rp_filter") == "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"
    assert sysctl_path("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"


# ---- kernel ----

@pytest.fixture
def lab():
    plan = sample.build("hk-t", nodes=2, pods_per_node=2, istio_rules=True, files=True)
    stages = []
    try:
        apply(plan, progress=lambda s, d, n: stages.append((s, d, n)))
        yield plan, stages
    finally:
        destroy(plan.lab, force=True)
    assert lingering("hk-t-") == []


@pytest.mark.kernel
@kernel
def test_apply_small_lab(lab):
    plan, stages = lab
    import iptc

    assert not iptc.Table._cache, "python-iptables' shared Table cache was used"
    assert {s for s, _, _ in stages} == {"pods", "configure", "files"}
    assert stages[-1][1] == stages[-1][2] and any(s == "pods" and d == n and n > 0 for s, d, n in stages)
    assert lingering("hk-t-") == sorted(n.name for n in plan.netns)
    assert lab_is_up("hk-t") and "hk-t" in list_labs()
    assert ledger.read_plan("hk-t") == plan

    # every pod reaches every other pod (same node, across the fabric)
    failed = [(a.ref, b.ip) for a in plan.pods for b in plan.pods if a is not b and not icmp_ping(a.netns, b.ip)]
    assert not failed, f"unreachable: {failed}"
    assert not icmp_ping("hk-t-n1-p0", "10.0.3.2", timeout=0.3)  # the check can fail: no such pod

    # iptables: every rule reads back exactly, in plan order, per chain; jumps at position 1
    for netns in {r.netns for r in plan.ipt_rules}:
        for table in {r.table for r in plan.ipt_rules if r.netns == netns}:
            got = saved_rules(netns, table)
            want: dict[str, list[str]] = defaultdict(list)
            for c in plan.ipt_chains:
                if c.netns == netns and c.table == table and c.jump_from:
                    want[c.jump_from].insert(0, f"-j {c.chain}")
            for r in plan.ipt_rules:
                if r.netns == netns and r.table == table:
                    want[r.chain].append(r.spec)
            assert dict(got) == dict(want), (netns, table)
    node1, zt_ns = "hk-t-node-1", "hk-t-n1-p0"
    zt_veth = sample.host_veth("hk-t", zt_ns)
    assert "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 " \
           "-j ISTIO_IN_REDIRECT" in sh("ip netns exec hk-t-n2-p0 iptables-legacy-save -t nat")

    out = sh(f"ip netns exec {node1} ipset list {istio.ZTUNNEL_PODS_IPSET}")
    assert "Type: hash:ip" in out and f'comment "{pod_uid(plan.pod("default/p1-1"))}"' in out and "10.0.1.3" in out

    rules = sh(f"ip netns exec {node1} ip rule show")
    assert "100:\tfrom all fwmark 0x200/0x200 goto 32766" in rules
    assert "101:\tfrom all fwmark 0x100/0x100 lookup 101" in rules
    assert "103:\tfrom all lookup 100" in rules
    assert f"default via 10.0.1.2 dev {zt_veth} onlink" in sh(f"ip netns exec {node1} ip route show table 102")
    assert "local default dev lo scope host" in sh(f"ip netns exec {zt_ns} ip route show table 100")
    assert "20000:\tfrom all fwmark 0x400/0xfff lookup 100" in sh(f"ip netns exec {zt_ns} ip rule show")

    # sysctls are per netns and differ from a fresh netns' defaults
    assert sh(f"ip netns exec {node1} sysctl -n net.ipv4.ip_forward").strip() == "1"
    assert sh(f"ip netns exec {node1} sysctl -n net.ipv4.conf.{zt_veth}.accept_local").strip() == "1"
    assert sh("ip netns exec hk-t-n1-p1 sysctl -n net.ipv4.ip_forward").strip() == "0"

    assert Path("/etc/netns/hk-t-n1-p1/hosts").read_text().endswith("10.0.1.3 p1-1\n")
    assert "10.0.1.3" in sh("ip netns exec hk-t-n1-p1 cat /etc/hosts")  # ip netns exec bind-mounts it

    rep = destroy("hk-t")
    assert sorted(rep.netns_deleted) == sorted(n.name for n in plan.netns)
    assert lingering("hk-t-") == [] and "hk-t" not in list_labs() and not lab_is_up("hk-t")
    assert not Path("/etc/netns/hk-t-n1-p1").exists()
    assert destroy("hk-t").existed is False  # idempotent


@pytest.mark.kernel
@kernel
def test_failed_route_rolls_back_everything(netlab_run_dir):
    base = sample.build("hk-f", nodes=2, pods_per_node=1, istio_rules=True, files=True)
    bad = Route("hk-f-node-1", "10.9.0.0/24", gateway="172.31.0.3")
    plan = dataclasses.replace(base, routes=base.routes + (bad,))
    try:
        with pytest.raises(ApplyError) as ei:
            apply(plan)
    finally:
        destroy("hk-f", force=True)
    assert "route 10.9.0.0/24 via 172.31.0.3 in netns hk-f-node-1: Network is unreachable" in str(ei.value)
    assert lingering("hk-f-") == []
    assert not (netlab_run_dir / "hk-f").exists()
    assert not Path("/etc/netns/hk-f-n1-p0").exists()


@pytest.mark.kernel
@kernel
def test_missing_sysctl_fails_unless_optional(netlab_run_dir):
    """A sysctl the kernel does not have is an error naming it; marked optional (a module's knob,
    like br_netfilter's), it is skipped."""
    base = sample.build("hk-o", nodes=1, pods_per_node=1)
    ghost = "net.ipv4.conf.all.netlab_no_such_knob"
    try:
        apply(dataclasses.replace(base, sysctls=base.sysctls + (Sysctl("hk-o-node-1", ghost, "0", optional=True),)))
    finally:
        destroy("hk-o", force=True)
    try:
        with pytest.raises(ApplyError) as ei:
            apply(dataclasses.replace(base, sysctls=base.sysctls + (Sysctl("hk-o-node-1", ghost, "0"),)))
    finally:
        destroy("hk-o", force=True)
    assert ghost in str(ei.value) and "No such file" in str(ei.value)
    assert lingering("hk-o-") == []


@pytest.mark.kernel
@kernel
@pytest.mark.parametrize("workers", [1, 2])
def test_pod_pipeline_with_other_worker_counts(netlab_run_dir, workers):
    """The pods phase runs a batcher and ``workers - 1`` makers (at least one of each, even for
    workers=1, where they used to wait on each other); every pod still reaches every other."""
    plan = sample.build("hk-w", nodes=2, pods_per_node=3)
    try:
        apply(plan, workers=workers)
        failed = [(a.ref, b.ip) for a in plan.pods for b in plan.pods if a is not b and not icmp_ping(a.netns, b.ip)]
        assert not failed, f"unreachable: {failed}"
    finally:
        destroy("hk-w", force=True)
    assert lingering("hk-w-") == []


def operstates(netns: str) -> dict[str, int]:
    """ifname -> operstate of every device in ``netns``, from a dump (which, unlike a single
    RTM_GETLINK, does not make the kernel finish pending linkwatch work first)."""
    with ns.in_netns(netns), rtnl.Rtnl() as r:
        return {name: state for name, _, state in r.links()}


@pytest.mark.kernel
@kernel
def test_every_pod_can_send_when_apply_returns(netlab_run_dir):
    """The first end of a veth to come up gets its queue discipline from the kernel's linkwatch,
    which does 100-200 devices a run and, past urgent runs, one run a second. When the pods'
    ends came up first and their node ends at the end, up to 8 s passed after a 1000-pod apply
    before every pod could send (operstate still down, packets dropped). Now each pod's end
    comes up second, and apply finishes what linkwatch has left on the node ends."""
    plan = sample.single_node("hk-rdy", 1000)
    try:
        apply(plan)
        waiting = [p.ref for p in plan.pods if operstates(p.netns)["eth0"] != rtnl.IF_OPER_UP]
        node = operstates(plan.nodes[0].netns)
        waiting += [dev for dev, st in node.items() if dev.startswith("veth") and st != rtnl.IF_OPER_UP]
        assert not waiting, f"{len(waiting)} veth ends not ready, e.g. {waiting[:5]}"
        last = plan.pods[-10:]
        mute = [p.ref for p in last if not icmp_ping(p.netns, plan.pods[0].ip, timeout=1.0)]
        assert not mute, f"cannot reach {plan.pods[0].ip} right after apply: {mute}"
    finally:
        destroy("hk-rdy", force=True)
    assert lingering("hk-rdy-") == []


@pytest.mark.kernel
@kernel
def test_veths_have_one_queue_pair(netlab_run_dir):
    """Every veth end apply makes (pod, node, fabric) has one TX and one RX queue, not one per
    possible CPU: see rtnl.link_create (it spares two RCU grace periods per veth)."""
    plan = sample.build("hk-q", nodes=1, pods_per_node=2)
    try:
        apply(plan)
        seen = {}
        for n in plan.netns:
            for d in json.loads(sh(f"ip netns exec {n.name} ip -d -j link show")):
                if d.get("linkinfo", {}).get("info_kind") == "veth":
                    seen[f"{n.name}/{d['ifname']}"] = (d["num_tx_queues"], d["num_rx_queues"])
        assert len(seen) == 2 * (1 + 2), seen  # the fabric veth and two pod veths, both ends
        assert set(seen.values()) == {(1, 1)}, seen
    finally:
        destroy("hk-q", force=True)


@pytest.mark.kernel
@kernel
@pytest.mark.parametrize("side", ["maker", "batcher"])
def test_pod_failure_on_either_side_of_the_pipeline_rolls_back(netlab_run_dir, side):
    """A pod's iptables rule is written by a maker, its routes are sent by the batcher: a
    failure on either side names the object, stops the other side and leaves nothing."""
    base = sample.build("hk-q", nodes=2, pods_per_node=4)
    pod = base.pods[5].netns
    if side == "maker":
        bad = IptRule(pod, "mangle", "OUTPUT", "-p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 "
                                               "--tproxy-mark 0x400/0xfff")  # PREROUTING only
        plan = dataclasses.replace(base, ipt_rules=base.ipt_rules + (bad,))
        expect = f"iptables -t mangle -A OUTPUT {bad.spec} in netns {pod}"
    else:
        bad = Route(pod, "10.9.0.0/24", gateway="172.31.0.3")
        plan = dataclasses.replace(base, routes=base.routes + (bad,))
        expect = f"route 10.9.0.0/24 via 172.31.0.3 in netns {pod}: Network is unreachable"
    try:
        with pytest.raises(ApplyError) as ei:
            apply(plan)
    finally:
        destroy("hk-q", force=True)
    assert expect in str(ei.value)
    assert lingering("hk-q-") == [] and not (netlab_run_dir / "hk-q").exists()


@pytest.mark.kernel
@kernel
def test_rejected_iptables_rule_is_named():
    base = sample.build("hk-g", nodes=1, pods_per_node=1)
    bad = IptRule("hk-g-node-1", "mangle", "OUTPUT",
                  "-p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff")  # PREROUTING only
    ok = IptRule("hk-g-node-1", "mangle", "OUTPUT", "-p udp -j RETURN")  # (an unconditional RETURN would make
    plan = dataclasses.replace(base, ipt_rules=(ok, bad))                # the bad rule unreachable: not checked)
    try:
        with pytest.raises(ApplyError) as ei:
            apply(plan)
    finally:
        destroy("hk-g", force=True)
    assert f"iptables -t mangle -A OUTPUT {bad.spec} in netns hk-g-node-1" in str(ei.value)
    assert lingering("hk-g-") == []


@pytest.mark.kernel
@kernel
def test_rejected_ipset_entry_is_named():
    """The entries go in one nfnetlink batch (kernel/ipsetnl): a refused one (here the same IP
    twice) is named by the ACK matched to its request, and apply rolls back."""
    base = sample.build("hk-i", nodes=1, pods_per_node=1, istio_rules=True)
    node = "hk-i-node-1"
    ents = [IpSetEntry(node, istio.ZTUNNEL_PODS_IPSET, f"10.9.0.{i}", f"hk/p{i}") for i in (1, 2, 3)]
    dup = IpSetEntry(node, istio.ZTUNNEL_PODS_IPSET, "10.9.0.2", "hk/again")
    plan = dataclasses.replace(base, ipset_entries=(*base.ipset_entries, *ents, dup))
    try:
        with pytest.raises(ApplyError) as ei:
            apply(plan)
        assert "ipset entry 10.9.0.2 in ztunnel-pods-ips in netns hk-i-node-1: element is already in the set" \
            in str(ei.value), str(ei.value)
    finally:
        destroy("hk-i", force=True)
    assert lingering("hk-i-") == []


@pytest.mark.kernel
@kernel
def test_destroy_after_sigkill(netlab_run_dir):
    code = ("import sys; from netlab.kernel import apply as a; from tests import sample_plans as sample\n"
            "p = sample.single_node('hk-k', 400)\n"
            "a.apply(p, progress=lambda s, d, n: print(s, d, n, flush=True))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "NETLAB_RUN_DIR": str(netlab_run_dir)})
    try:
        seen = ""
        for line in proc.stdout:  # kill while pods are being made
            seen = line
            stage, done, total = line.split()
            if stage == "pods" and int(done) > int(total) // 3:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, seen
    assert lingering("hk-k-"), "killed too late or too early: nothing was created"
    assert not lab_is_up("hk-k")
    rep = destroy("hk-k")  # the applying pid is dead: its lock does not block
    assert rep.netns_deleted and not rep.errors
    assert lingering("hk-k-") == []
    assert not (netlab_run_dir / "hk-k").exists()


@pytest.mark.kernel
@kernel
def test_destroy_stops_recorded_processes_only():
    plan = sample.build("hk-p", nodes=1, pods_per_node=1)
    apply(plan)
    sleeper = subprocess.Popen(["ip", "netns", "exec", "hk-p-n1-p0", "sleep", "60"])
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        ledger.record_process("hk-p", "sleeper", sleeper.pid)
        # a record whose starttime does not match (a reused PID) must never be signalled
        with open(StateDir.of("hk-p").ledger, "a") as f:
            f.write(json.dumps({"op": "process", "name": "stranger", "pid": stranger.pid, "starttime": 1}) + "\n")
        t = time.monotonic()
        rep = destroy("hk-p")
        assert rep.processes_stopped == ["sleeper"] and time.monotonic() - t < 2
        assert sleeper.wait(1) == -signal.SIGTERM
        assert stranger.poll() is None
        assert lingering("hk-p-") == []
    finally:
        stranger.kill()
        stranger.wait()
        sleeper.kill()
        destroy("hk-p", force=True)


@pytest.mark.kernel
@kernel
def test_apply_refuses_existing_lab_and_foreign_netns():
    plan = sample.build("hk-e", nodes=1, pods_per_node=1)
    apply(plan)
    try:
        with pytest.raises(ValueError, match="already exist"):
            apply(plan)
        assert lab_is_up("hk-e")  # the refused second apply did not roll back the first
    finally:
        destroy("hk-e")
    assert lingering("hk-e-") == []
