"""`netlab doctor`: probe each kernel feature the lab needs, inside a throwaway namespace.

Every probe runs in ``netlab-doctor-<pid>``, a namespace made for the purpose and deleted at the
end, so asking "does TPROXY work here" never changes the root namespace.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from netlab import netns as ns


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    used_for: str
    fix: str
    required: bool = True


@contextlib.contextmanager
def _probe_netns() -> Iterator[str]:
    name = f"netlab-doctor-{os.getpid()}"
    ns.delete_netns(name)
    ns.create_netns(name)
    try:
        yield name
    finally:
        ns.delete_netns(name)


def _run(netns: str, *argv: str) -> tuple[bool, str]:
    r = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True)
    return r.returncode == 0, (r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else ""


def run_checks() -> list[Check]:
    out: list[Check] = []
    if os.geteuid() != 0:
        return [Check("root", False, "not running as root", "creating namespaces, links, iptables rules", "run with sudo")]
    for tool, pkg, what in (("ip", "iproute2", "ip netns exec, inspection"),
                            ("iptables-legacy-save", "iptables", "netlab rules, reference tests"),
                            ("ipset", "ipset", "netlab rules (ipset list)")):
        p = shutil.which(tool)
        out.append(Check(tool, p is not None, p or "not found", what, f"apt-get install {pkg}"))
    try:
        with _probe_netns() as probe:
            out.append(Check("netns", True, "created and deleted a named netns", "one netns per node and pod",
                             "a kernel with CONFIG_NET_NS"))
            ok, msg = _run(probe, "ip", "link", "add", "dv0", "type", "veth", "peer", "name", "dv1")
            out.append(Check("veth", ok, msg or "veth pair created", "pod <-> node and node <-> fabric links", "CONFIG_VETH"))
            ok, msg = _run(probe, "ip", "link", "add", "dbr0", "type", "bridge")
            out.append(Check("bridge", ok, msg or "bridge created", "the lab fabric between nodes", "CONFIG_BRIDGE"))
            ok, msg = _run(probe, "ip", "tuntap", "add", "dtap0", "mode", "tap")
            out.append(Check("tun/tap", ok, msg or "TAP created", "userspace Geneve (istioin/istioout over TAP)",
                             "CONFIG_TUN and /dev/net/tun"))
            ok, msg = _run(probe, "ip", "link", "add", "dgnv0", "type", "geneve", "id", "1000", "remote", "10.255.0.1")
            out.append(Check("geneve", ok, "kernel geneve available" if ok else f"no kernel geneve ({msg})",
                             "kernel Geneve tunnels (--tunnel kernel)",
                             "none needed: --tunnel auto uses the wire-identical userspace Geneve; for kernel Geneve "
                             "load the geneve module (modprobe geneve) or run scripts/vm-test", required=False))
            ok, msg = _run(probe, "iptables-legacy", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-j", "TPROXY",
                           "--on-port", "15001", "--on-ip", "127.0.0.1", "--tproxy-mark", "0x400/0xfff")
            out.append(Check("TPROXY", ok, msg or "TPROXY target accepted", "ztunnel capture (reference §2.2)",
                             "CONFIG_NETFILTER_XT_TARGET_TPROXY, CONFIG_NF_TPROXY_IPV4"))
            ok, msg = _run(probe, "ipset", "create", "dset", "hash:ip", "comment")
            out.append(Check("ipset hash:ip", ok, msg or "hash:ip with comments", "ztunnel-pods-ips (reference §1.4)",
                             "CONFIG_IP_SET_HASH_IP"))
            for match, args in (("mark/connmark", ["-m", "connmark", "--mark", "0x220/0x220", "-j", "MARK", "--set-xmark", "0x200/0x200"]),
                                ("set match", ["-m", "set", "--match-set", "dset", "src", "-j", "RETURN"]),
                                ("owner match", ["-m", "owner", "--uid-owner", "1337", "-j", "RETURN"])):
                ok, msg = _run(probe, "iptables-legacy", "-t", "mangle", "-A", "OUTPUT", *args)
                out.append(Check(match, ok, msg or "accepted", "ambient marks and sidecar capture rules",
                                 "the xtables match modules (CONFIG_NETFILTER_XT_MATCH_*)"))
    except OSError as e:
        out.append(Check("netns", False, str(e), "everything", "a kernel with network namespaces, run as root"))
    try:
        importlib.import_module("iptc")  # python-iptables loads libiptc/libxtables on import

        out.append(Check("python-iptables", True, "libiptc/libxtables loaded", "installing iptables rules", ""))
    except Exception as e:  # pragma: no cover - depends on the host
        out.append(Check("python-iptables", False, str(e), "installing iptables rules",
                         "apt-get install iptables (libxtables) and pip install python-iptables"))
    for tool, pkg, what in (("tshark", "tshark", "decoding captures in tests"), ("rsvg-convert", "librsvg2-bin", "netlab diagram -o FILE.png/.pdf"),
                            ("curl", "curl", "requests from pods in the README walk-throughs")):
        p = shutil.which(tool)
        out.append(Check(tool, p is not None, p or "not found", what, f"apt-get install {pkg}", required=False))
    return out
