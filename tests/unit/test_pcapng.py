"""The pcapng writer, read back by the two independent readers users will use: tshark and scapy."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from netlab.verify.pcapng import PcapngWriter, seconds_to_ns, write_frames

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")

T0 = 1_700_000_000_123_456_789  # ns; the last digits prove nanosecond resolution survives


def syn(dst: str = "10.96.0.10", dport: int = 8000) -> bytes:
    return bytes(Ether() / IP(src="10.0.1.3", dst=dst) / TCP(sport=40000, dport=dport, flags="S"))


def geneve_syn() -> bytes:
    inner = IP(src="10.0.1.3", dst="10.96.0.10") / TCP(sport=40000, dport=8000, flags="S")
    return bytes(Ether() / IP(src="10.0.1.1", dst="10.0.1.2") / UDP(sport=5555, dport=6081)
                 / GENEVE(vni=1001, proto=0x0800) / inner)


def tshark_fields(path: Path, *fields: str, extra: tuple[str, ...] = ()) -> list[list[str]]:
    argv = ["tshark", "-r", str(path), "-T", "fields", *extra]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines()]


def write_sample(path: Path) -> None:
    with open(path, "wb") as f:
        w = PcapngWriter(f)
        a = w.add_interface("lab-node-a/veth1234", description="node node-a")
        b = w.add_interface("lab-istio-system-ztunnel-node-a/pistioout")
        w.write_packet(a, T0, geneve_syn(), direction="out")
        w.write_packet(b, T0 + 1, syn() + b"\x01\x02\x03", direction="in")  # odd length: padding
        w.write_packet(a, T0 + 2, syn(dport=15008))  # no direction known


@needs_tshark
def test_tshark_reads_interfaces_timestamps_and_direction(tmp_path: Path) -> None:
    p = tmp_path / "f.pcapng"
    write_sample(p)
    rows = tshark_fields(p, "frame.interface_name", "frame.time_epoch", "frame.packet_flags_direction",
                         "tcp.dstport")
    assert [r[0] for r in rows] == ["lab-node-a/veth1234", "lab-istio-system-ztunnel-node-a/pistioout",
                                    "lab-node-a/veth1234"]
    assert [r[1] for r in rows] == ["1700000000.123456789", "1700000000.123456790", "1700000000.123456791"]
    assert [int(r[2], 16) if r[2] else None for r in rows] == [2, 1, None]  # outbound, inbound, none
    assert rows[1][3] == "8000"


@needs_tshark
def test_tshark_decodes_geneve_vni_and_inner_syn(tmp_path: Path) -> None:
    p = tmp_path / "f.pcapng"
    write_sample(p)
    rows = tshark_fields(p, "geneve.vni", "ip.dst", "tcp.dstport", "tcp.flags.syn", extra=("-Y", "geneve"))
    assert len(rows) == 1
    vni, ips, dport, syn_flag = rows[0]
    assert int(vni, 0) == 1001 and ips.split(",")[-1] == "10.96.0.10" and dport == "8000" and syn_flag in ("1", "True")


def test_scapy_reads_back(tmp_path: Path) -> None:
    p = tmp_path / "f.pcapng"
    write_sample(p)
    pkts = rdpcap(str(p))
    assert [pk.sniffed_on for pk in pkts] == ["lab-node-a/veth1234", "lab-istio-system-ztunnel-node-a/pistioout",
                                             "lab-node-a/veth1234"]
    assert int(pkts[0].time * 10**9) == T0
    assert pkts[0][GENEVE].vni == 1001 and pkts[0][GENEVE][TCP].dport == 8000
    assert bytes(pkts[1])[-3:] == b"\x01\x02\x03"  # the padding of the block is not part of the frame


@dataclass
class FakeFrame:
    netns: str
    iface: str
    direction: str
    timestamp: float
    raw: bytes


def test_write_frames_declares_idle_interfaces_and_sorts_by_time(tmp_path: Path) -> None:
    p = tmp_path / "f.pcapng"
    frames = [FakeFrame("ns-b", "eth0", "in", 1_700_000_000.5, syn()),
              FakeFrame("ns-a", "eth0", "out", 1_700_000_000.25, syn())]
    counts = write_frames(str(p), frames, [("ns-idle", "lo"), ("ns-a", "eth0")])
    assert counts == {("ns-idle", "lo"): 0, ("ns-a", "eth0"): 1, ("ns-b", "eth0"): 1}
    pkts = rdpcap(str(p))
    assert [pk.sniffed_on for pk in pkts] == ["ns-a/eth0", "ns-b/eth0"]
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "-r", str(p), "-q", "-z", "io,phs"], capture_output=True, text=True)
        assert out.returncode == 0


def test_seconds_to_ns_keeps_microseconds() -> None:
    assert abs(seconds_to_ns(1_700_000_000.123456) - 1_700_000_000_123_456_000) < 1000
    assert seconds_to_ns(0.0) == 0


def test_unknown_interface_is_refused(tmp_path: Path) -> None:
    with open(tmp_path / "f.pcapng", "wb") as f:
        w = PcapngWriter(f)
        with pytest.raises(ValueError):
            w.write_packet(0, T0, syn())
