"""The kernel facts the in-pod datapath rests on (inpod reference §1.7, §9), checked on this kernel
in scratch namespaces:

* a veth into another netns clears ``skb->mark`` (KSCRUB): ztunnel's 0x539 never reaches a node;
* ``lo`` keeps it: that is how mangle ISTIO_PRERT #1 sees ztunnel's own packets (§1.7);
* REDIRECT in PREROUTING rewrites the destination to the ingress interface's primary address
  (KRED): the pod's own IP, what ztunnel's 15006 sees as local address.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.kernel

A, B = "ik-a", "ik-b"


def sh(*argv: str, check: bool = True) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv}: {p.stderr}")
    return p.stdout


@pytest.fixture
def pair() -> Iterator[None]:
    for n in (A, B):
        sh("ip", "netns", "add", n)
        sh("ip", "-n", n, "link", "set", "lo", "up")
    try:
        sh("ip", "link", "add", "ika", "netns", A, "type", "veth", "peer", "name", "ikb", "netns", B)
        sh("ip", "-n", A, "addr", "add", "10.77.0.1/24", "dev", "ika")
        sh("ip", "-n", B, "addr", "add", "10.77.0.2/24", "dev", "ikb")
        sh("ip", "-n", A, "link", "set", "ika", "up")
        sh("ip", "-n", B, "link", "set", "ikb", "up")
        yield
    finally:
        for n in (A, B):
            sh("ip", "netns", "delete", n, check=False)


def counts(netns: str) -> dict[str, int]:
    """Packets counted by the two mark-matching rules of mangle PREROUTING."""
    out = sh("ip", "netns", "exec", netns, "iptables-legacy", "-t", "mangle", "-L", "PREROUTING", "-v", "-n", "-x")
    got = {}
    for line in out.splitlines():
        if "mark match" in line:
            got[line.split("mark match")[1].strip()] = int(line.split()[0])
    return got


def test_veth_scrubs_the_mark_and_lo_keeps_it(pair: None) -> None:
    for n in (A, B):
        for m in ("0x539/0xfff", "0x0/0xfff"):
            sh("ip", "netns", "exec", n, "iptables-legacy", "-t", "mangle", "-A", "PREROUTING", "-p", "udp",
               "--dport", "9999", "-m", "mark", "--mark", m)
    sh("ip", "netns", "exec", A, "python3", "-c",
       "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.setsockopt(socket.SOL_SOCKET,36,0x539)\n"
       "s.sendto(b'x',('10.77.0.2',9999))\ns.sendto(b'x',('10.77.0.1',9999))")
    assert counts(B) == {"0x539/0xfff": 0, "0x0/0xfff": 1}  # over the veth: mark 0
    assert counts(A) == {"0x539/0xfff": 1, "0x0/0xfff": 0}  # to its own address, over lo: 0x539 kept


def test_prerouting_redirect_picks_the_ingress_primary_address(pair: None) -> None:
    sh("ip", "-n", B, "addr", "add", "10.77.0.9/24", "dev", "ikb")  # a secondary: not the one chosen
    sh("ip", "netns", "exec", B, "iptables-legacy", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "80",
       "-j", "REDIRECT", "--to-ports", "15006")
    server = subprocess.Popen(
        ["ip", "netns", "exec", B, "python3", "-c",
         "import socket,struct\ns=socket.socket()\ns.bind(('0.0.0.0',15006))\ns.listen()\nprint('up',flush=True)\n"
         "c,_=s.accept()\nraw=c.getsockopt(socket.SOL_IP,80,16)\n"
         "print(c.getsockname()[0], socket.inet_ntoa(raw[4:8]), struct.unpack('!H',raw[2:4])[0], flush=True)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        sh("ip", "netns", "exec", A, "python3", "-c",
           "import socket\nsocket.create_connection(('10.77.0.9',80),timeout=3).close()")
        local, orig_ip, orig_port = server.stdout.readline().split()
        assert local == "10.77.0.2"  # the primary address of ikb, not the 10.77.0.9 dialled
        assert (orig_ip, orig_port) == ("10.77.0.9", "80")  # SO_ORIGINAL_DST still says where it was going
    finally:
        server.kill()
        server.wait()
