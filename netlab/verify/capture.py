"""``netlab capture``: record lab interfaces to one pcapng while a command runs (or until Ctrl-C).

Why not ``ip netns exec ... tcpdump`` per interface: that gives one file per namespace with no
common clock order and no way to tell which netns a frame was seen in. Here one
:class:`~netlab.verify.sniff.Capture` opens every socket inside its own namespace, and the
frames go to a single pcapng whose interfaces are named ``<netns>/<iface>`` (see
:mod:`netlab.verify.pcapng`), so Wireshark shows the whole walk of a request in order.

Which interfaces:

* ``--iface NETNS:IFACE`` (repeatable): NETNS is a full netns name, a node, a pod (``name`` or
  ``ns/name``) or ``ztunnel:<node>``; split at the *last* ``:``.
* ``--hops [PATH]``: the interfaces named in the hop contracts of the topology's paths (one, or
  all); symbolic ``veth(<ns>/<pod>)``, ``veth(ztunnel)`` and ``veth(waypoint:<ns>)`` become the
  node-side veth in the hop's node. A path without ``hops`` falls back to every interface of every namespace on the nodes it
  touches (client's node, endpoints' nodes, waypoints' nodes) plus their fabric ports.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from netlab.errors import NetlabError, UsageError
from netlab.plan.types import Plan, PodInfo
from netlab.verify.labview import LabView

DEFAULT_FILTER = "not arp and not ip6"  # the lab is IPv4-only; ARP/ND only hide the request
SETTLE = 0.3  # seconds to let frames still in flight (proxy legs, FINs) arrive after CMD exits

Target = tuple[str, str]


# ---- choosing interfaces --------------------------------------------------------------------------
def parse_iface(lab: LabView, spec: str) -> Target:
    """``NETNS:IFACE`` -> (full netns name, iface)."""
    where, sep, iface = spec.rpartition(":")
    if not sep or not where or not iface:
        raise UsageError(f"--iface {spec!r}: expected NETNS:IFACE (NETNS: netns, node, pod or ztunnel:<node>)")
    return lab.netns_of(where), iface


def interfaces_of(plan: Plan, netns: str) -> list[str]:
    """Every interface the plan creates in ``netns`` (both veth ends, taps, bridges), plus ``lo``
    for pod namespaces (a sidecar hands requests to its app over lo)."""
    names = [link.name for link in plan.links if link.netns == netns]
    names += [link.peer_name for link in plan.links if link.peer_netns == netns and link.peer_name]
    if any(n.name == netns and n.role == "pod" for n in plan.netns):
        names.append("lo")
    return list(dict.fromkeys(names))


def _pods_behind(plan: Plan, host: str) -> list[PodInfo]:
    """Endpoint pods of ``host`` (``svc.ns``, a VIP or a pod IP)."""
    name = host.split(":", 1)[0]
    for s in plan.services:
        if name in (f"{s.name}.{s.namespace}", s.vip) or name.startswith(f"{s.name}.{s.namespace}."):
            return [plan.pod(ref) for ref in s.endpoints]
    return [p for p in plan.pods if p.ip == name]


def _resolve_hop(plan: Plan, lab: LabView, at: str, iface: str) -> Target | None:
    """A contract hop (``at`` + ``iface``) to a capture target; None when it names no device
    (e.g. a proxy listener without an interface)."""
    kind, _, ref = at.partition(":")
    m = re.fullmatch(r"veth\((.+)\)", iface)
    if m:  # the node-side veth of a pod lives in its node's namespace
        what = m.group(1)
        if what == "ztunnel" or what.startswith("waypoint:"):  # veth(ztunnel), veth(waypoint:<ns>)
            mode, ns = (what, None) if what == "ztunnel" else ("waypoint", what.split(":", 1)[1])
            pods = [p for p in plan.pods if p.mode == mode and (ns is None or p.namespace == ns)
                    and (kind != "node" or p.node == ref)]
            if not pods:
                return None
            pod = pods[0]
        else:
            pod = plan.pod(what)
        return plan.node(pod.node).netns, pod.host_veth
    if kind == "node":
        return plan.node(ref).netns, iface
    if kind in ("pod", "ztunnel"):
        return lab.netns_of(at if kind == "ztunnel" else ref), iface
    if kind == "waypoint":
        for p in plan.pods:
            if p.mode == "waypoint" and p.namespace == ref:
                return p.netns, iface
    return None


def hop_targets(lab: LabView, path_name: str) -> list[Target]:
    """Interfaces of the hop contract of one path (``""``: all paths of the lab's topology)."""
    plan = lab.plan
    paths = [p for p in plan.paths if not path_name or p.name == path_name]
    if not paths:
        have = ", ".join(p.name for p in plan.paths) or "none"
        raise UsageError(f"--hops {path_name or ''}: topology {plan.topology!r} has no such path (paths: {have}); "
                         "use --iface NETNS:IFACE")
    out: list[Target] = []
    for path in paths:
        named: list[Target] = []
        for h in path.hops:
            if not h.iface:
                continue  # a proxy listener: no device of its own
            try:
                t = _resolve_hop(plan, lab, h.at, h.iface)
            except (KeyError, NetlabError) as e:
                raise UsageError(f"--hops: path {path.name} hop ({h.n}) at {h.at} iface {h.iface}: {e}") from None
            if t:
                named.append(t)
        if named:
            out += named
            continue
        # no contract yet: everything on the nodes the request can cross
        nodes = {plan.pod(path.from_).node} | {p.node for p in _pods_behind(plan, path.to)}
        nodes |= {p.node for p in plan.pods if p.mode == "waypoint"}
        for node in sorted(nodes):
            nns = plan.node(node).netns
            for ns in [nns] + [p.netns for p in plan.pods if p.node == node]:
                out += [(ns, i) for i in interfaces_of(plan, ns) if not (ns == nns and i == "lo")]
            out += [(link.netns, link.name) for link in plan.links if link.peer_netns == nns]  # fabric port
    return list(dict.fromkeys(out))


def linktype_of(netns: str, iface: str) -> int:
    """pcapng linktype from the device's ``link_type``: Ethernet for veth/tap/bridge/geneve and
    lo (AF_PACKET hands lo frames with a zero Ethernet header), raw IP for an L3 device."""
    from netlab.verify.pcapng import LINKTYPE_ETHERNET, LINKTYPE_RAW

    r = subprocess.run(["ip", "-n", netns, "-j", "link", "show", "dev", iface], capture_output=True, text=True)
    try:
        kind = json.loads(r.stdout)[0].get("link_type", "ether")
    except (ValueError, IndexError):
        return LINKTYPE_ETHERNET
    return LINKTYPE_RAW if kind == "none" else LINKTYPE_ETHERNET


# ---- running -------------------------------------------------------------------------------------
def _command(cmd: Sequence[str]) -> list[str]:
    """Strip argparse's ``--``; run ``netlab`` as this interpreter's module when not on PATH
    (a venv that is not activated), so ``-- netlab exec ...`` works under sudo too."""
    argv = list(cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv and argv[0] == "netlab" and shutil.which("netlab") is None:
        argv = [sys.executable, "-m", "netlab.cli", *argv[1:]]
    return argv


def _wait_for_interrupt() -> None:
    """Block until SIGINT/SIGTERM (Ctrl-C or kill) without a traceback."""
    done = threading.Event()
    old = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sys.stderr.write("capturing; Ctrl-C to stop\n")
        sys.stderr.flush()
        while not done.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def record(targets: Sequence[Target], path: str, *, bpf: str | None, cmd: Sequence[str] = (),
           settle: float = SETTLE) -> tuple[int, dict[Target, int], int]:
    """Capture ``targets`` while ``cmd`` runs (or until Ctrl-C when empty), write ``path``.
    Returns (command exit status, frames per target, kernel drops)."""
    from netlab.verify.pcapng import write_frames
    from netlab.verify.sniff import Capture, CaptureError

    try:
        cap = Capture(targets, bpf=bpf).start()
    except CaptureError as e:
        raise UsageError(str(e)) from None
    rc = 0
    try:
        if cmd:
            try:
                rc = subprocess.run(list(cmd)).returncode
            except FileNotFoundError:
                raise UsageError(f"command not found: {cmd[0]}") from None
            except KeyboardInterrupt:
                rc = 130
        else:
            _wait_for_interrupt()
    finally:
        frames = cap.stop(settle=settle if cmd else 0.0)
    linktypes = {t: linktype_of(*t) for t in targets}
    counts = write_frames(path, frames, list(targets), linktypes=linktypes)
    return rc, counts, cap.drops + cap.overflow


def summary(path: str, counts: dict[Target, int], drops: int) -> str:
    """One line: total, then frames per interface (busiest first; idle ones counted, not named)."""
    total = sum(counts.values())
    busy = sorted(((n, t) for t, n in counts.items() if n), key=lambda x: (-x[0], x[1]))
    idle = len(counts) - len(busy)
    per = ", ".join(f"{ns}/{i}: {n}" for n, (ns, i) in busy)
    tail = f"; {idle} idle interface{'s' if idle != 1 else ''}" if idle else ""
    lost = f"; {drops} dropped" if drops else ""
    return f"wrote {path}: {total} frames on {len(counts)} interfaces ({per or 'none'}{tail}{lost})"


def capture(lab: LabView, output: str, *, ifaces: Sequence[str] = (), hops: str | None = None,
            bpf: str | None = DEFAULT_FILTER, cmd: Sequence[str] = ()) -> tuple[int, str]:
    """``netlab capture``: record ``ifaces`` (``NETNS:IFACE`` each) or, without them, the interfaces
    of path ``hops``'s hop contract (``""``: every path's) while ``cmd`` runs (until Ctrl-C when it
    is empty), into the pcapng file ``output``; ``bpf`` None captures everything.
    Returns CMD's exit status (0 after Ctrl-C) and the one-line summary of what was written."""
    if ifaces:
        targets = [parse_iface(lab, s) for s in ifaces]
    elif hops is not None:
        targets = hop_targets(lab, hops)
    else:
        raise UsageError("say what to capture: --iface NETNS:IFACE (repeatable) or --hops [PATH]")
    rc, counts, drops = record(targets, output, bpf=bpf, cmd=_command(cmd))
    return rc, summary(output, counts, drops)


__all__ = ["DEFAULT_FILTER", "capture", "hop_targets", "interfaces_of", "parse_iface", "record", "summary"]
