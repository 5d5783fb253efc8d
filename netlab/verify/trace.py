"""`netlab trace`: send one tagged request from a pod and show every hop it took, checked
against the topology path's hop contract.

Why this shape: the seed article explains each path as a numbered list of hops ("(1) (2) (3) the
request leaves sleep's veth, is marked and routed to istioout ..."). A trace reproduces that list
from evidence, not from the plan: the SYN of every TCP leg is captured on each interface of each
lab namespace it crosses (kernel timestamps order them), the proxies' connection logs join one leg
to the next by 4-tuple, iptables counters confirm which rules matched, and ``ip route get`` with
the packet's mark names the route the kernel picks. The request carries a header
``x-netlab-trace: <id>`` and leaves from a source port chosen here, so it cannot be confused with
other traffic of the lab. What differs between the lab's two datapaths (where a proxy listens,
which mark its sockets carry, when a leg has reached the app) is asked of
:mod:`netlab.verify.datapaths`; a lab of datapath inpod is checked against its paths' inpod contracts.

``TraceResult.to_dict()`` (also what ``--json`` prints; the diagram draws from it)::

    {
      "lab": "ht-s2", "trace_id": "3f9c...", "from": "foo/sleep", "to": "httpbin.bar-1:8000",
      "url": "/headers", "status": 200,                 # HTTP status the client got (0: no response)
      "elapsed_ms": 412.0,
      "contract": "S2" | null,                          # path whose hops were checked
      "match": true | false | null,                     # null: no contract to check against
      "diverged": null | {"expected": {<Hop of the contract>}, "observed": <hop dict> | null,
                          "reason": "text"},
      "hops": [                                         # observed, in order
        {
          "n": 1,                      # position in the observed list (1-based)
          "seed_n": "1" | null,        # contract number this hop satisfied (the seed's "(1)")
          "t": 1712345678.123456,      # kernel receive timestamp (proxy hops: accept time)
          "kind": "packet" | "proxy",
          "at": "pod:foo/sleep" | "node:node-a" | "ztunnel:node-a" | "waypoint:bar-2/waypoint",
          "netns": "ht-s2-foo-sleep",
          "node": "node-a",
          "iface": "veth2695b381",     # real name; proxy hops: null
          "iface_sym": "veth(foo/sleep)",   # symbolic, as contracts write it
          "dir": "in" | "out" | null,  # in = received by this netns on iface; proxy hops: null
          "src": "10.0.1.3:40123", "dst": "10.96.0.10:8000",   # inner addresses of the SYN
          "proto": "tcp" | "hbone",    # hbone: a TCP leg to :15008 carrying HTTP/2 CONNECT
          "encap": null | {"type": "geneve", "vni": 1001, "outer_src": "10.0.1.1", "outer_dst": "10.0.1.2"},
          "mark": "0x100" | null,      # skb mark after this netns' PREROUTING (derived, counters-checked)
          "rules": ["§1.5 mangle ztunnel-PREROUTING #15", "§1.5 nat ztunnel-PREROUTING #1"],
          "route": "ip rule 101 fwmark 0x100/0x100 -> table 101: 10.96.0.10 via 192.168.127.2 dev istioout" | "",
          "proxy": null | {"component": "ztunnel-node-a", "listener": "outbound:15001",
                           "up_src": "10.0.1.3:51234", "up_dst": "10.0.2.3:15008",
                           "proto": "hbone", "authority": "10.0.2.3:80", "outcome": "ok"},
          "what": "short human text"
        }, ...
      ]
    }
"""

from __future__ import annotations

import errno
import random
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from netlab.errors import NetlabError, UsageError
from netlab.mesh.connlog import LegFollower
from netlab.netns import in_netns
from netlab.plan.types import Plan, PodInfo
from netlab.state import ConnLeg, StateDir
from netlab.topology.model import RequestPath
from netlab.verify import datapaths, iptsim
from netlab.verify.contract import Divergence, describe, find_contract, match, plan_contracts
from netlab.verify.hops import Geography, ObservedHop, Seg, parse_frame
from netlab.verify.labview import LabView
from netlab.verify.sniff import BPF_SYN_OR_GENEVE, Capture

# Captured: the SYN of every TCP leg, and Geneve frames (the SYN inside is picked out in Python),
# with a fixed BPF program and frames parsed by netlab.verify.hops: no scapy, no libpcap.
PROXY_KINDS = ("ztunnel", "sidecar", "waypoint")
LEG_WAIT = 1.5  # s to wait for the next leg of the request after the response
APP_UID = 0  # the trace client runs as root inside the pod netns, like `netlab exec`
Counters = dict[tuple[str, str], int]  # (netns, rule ref) -> packets


@dataclass
class TraceResult:
    lab: str
    trace_id: str
    src: str
    dst: str
    url: str
    status: int
    body: str
    elapsed_ms: float
    hops: list[ObservedHop]
    contract: RequestPath | None = None
    divergence: Divergence | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def matched(self) -> bool | None:
        if self.contract is None:
            return None
        return self.divergence is None and not self.error

    def to_dict(self) -> dict[str, Any]:
        return {
            "lab": self.lab, "trace_id": self.trace_id, "from": self.src, "to": self.dst, "url": self.url,
            "status": self.status, "elapsed_ms": round(self.elapsed_ms, 1),
            "contract": self.contract.name if self.contract else None, "match": self.matched,
            "diverged": self.divergence.to_dict() if self.divergence else None,
            "error": self.error or None, "notes": self.notes,
            "hops": [h.to_dict() for h in self.hops],
        }

    def render(self) -> str:
        """The numbered list, seed style: ``(n)`` where a contract hop matched, ``·`` between."""
        lines = [f"trace {self.trace_id}: {self.src} -> {self.dst}{self.url}  HTTP {self.status or '-'}  "
                 f"({self.elapsed_ms:.0f} ms, lab {self.lab})"]
        for h in self.hops:
            label = f"({h.seed_n})" if h.seed_n else "  ·"
            if h.kind == "proxy" and h.proxy:
                p = h.proxy
                lines.append(f"{label:>5} {h.at:<26} {h.listener_sym:<18}     {h.src} -> {h.dst}  ==> "
                             f"{p['up_src']} -> {p['up_dst']} {p['proto']}"
                             + (f" :authority {p['authority']}" if p.get("authority") and p["proto"] == "hbone" else "")
                             + (f"  [{p['outcome']}]" if p.get("outcome") not in (None, "ok") else ""))
                denial = _denial(p)
                if denial:
                    lines.append(f"{'':>6}{denial}")
                continue
            line = f"{label:>5} {h.at:<26} {h.iface_sym or '':<18} {h.dir or '':<4} {h.src} -> {h.dst}"
            if h.encap:
                e = h.encap
                line += f"  geneve vni {e['vni']} {e.get('outer_src') or '?'} -> {e.get('outer_dst') or '?'}"
            lines.append(line)
            if h.mark:
                lines.append(f"{'':>6}mark {h.mark:#x}")
            if h.rules:
                lines.append(f"{'':>6}rules: " + ", ".join(h.rules))
            if h.rules_unconfirmed:
                lines.append(f"{'':>6}rules (predicted, counter did not move): " + ", ".join(h.rules_unconfirmed))
            if h.route:
                lines.append(f"{'':>6}route: {h.route}")
        for n in self.notes:
            lines.append(f"note: {n}")
        if self.error:
            lines.append(f"error: {self.error}")
        if self.contract is None:
            lines.append("contract: none found for this from/to (use --contract NAME); hops not checked")
        elif self.matched:
            lines.append(f"contract {self.contract.name}: MATCH ({len(self.contract.hops)} hops)")
        else:
            lines.append(f"contract {self.contract.name}: MISMATCH: " + (str(self.divergence) if self.divergence else self.error))
        return "\n".join(lines)


# ---- resolving the destination -----------------------------------------------------------------
def resolve_dst(plan: Plan, dst: str) -> tuple[str, int, str]:
    """``<svc>.<ns>[.svc.cluster.local][:port]``, a VIP, a pod IP or ``<ns>/<pod>``; -> (ip, port, host)."""
    host, _, port_s = dst.rpartition(":") if ":" in dst else (dst, "", "")
    if not port_s.isdigit():
        raise UsageError(f"--to {dst!r}: port must be a number")
    port = int(port_s) if port_s else 80
    name = host.removesuffix(".cluster.local").removesuffix(".svc")
    for s in plan.services:
        if name in (f"{s.name}.{s.namespace}", s.vip) or (name == s.name and sum(x.name == s.name for x in plan.services) == 1):
            return s.vip, port, host
    for p in plan.pods:
        if name in (p.ip, p.ref):
            return p.ip, port, host
    try:
        socket.inet_aton(name)
        return name, port, host
    except OSError:
        raise UsageError(f"--to {dst!r}: no service <svc>.<ns>, VIP or pod of lab {plan.lab!r} is called {host!r}") from None


# ---- the tagged request ------------------------------------------------------------------------
def open_client(pod: PodInfo) -> tuple[socket.socket, int]:
    """A TCP socket made inside the pod's netns, bound to the pod IP and a free port chosen here
    (below the ephemeral range, so no proxy's own connection can take it)."""
    with in_netns(pod.netns):
        for _ in range(50):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            port = random.randint(20000, 30999)
            try:
                s.bind((pod.ip, port))
                return s, port
            except OSError as e:
                s.close()
                if e.errno != errno.EADDRINUSE:
                    raise
    raise NetlabError(f"no free source port in {pod.ref}")


def http_get(s: socket.socket, ip: str, port: int, host: str, url: str, trace_id: str, timeout: float) -> tuple[int, str, str]:
    """HTTP/1.1 GET with ``x-netlab-trace``; -> (status, body, error). Connection: close, so every
    proxy sees its legs end and writes its connection log line right away."""
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        req = (f"GET {url} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: netlab-trace\r\n"
               f"x-netlab-trace: {trace_id}\r\nAccept: */*\r\nConnection: close\r\n\r\n")
        s.sendall(req.encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        return 0, "", f"request failed: {e.strerror or e}"
    finally:
        s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return 0, "", "no HTTP response" + (f" ({buf[:60]!r})" if buf else " (connection closed)")
    return int(parts[1]), body.decode(errors="replace"), ""


# ---- connection logs -----------------------------------------------------------------------------
class LegLog:
    """New legs of every proxy's connection log since construction (both files of each: see
    :mod:`netlab.mesh.connlog`); lines that are no leg are skipped and counted."""

    def __init__(self, plan: Plan, files: StateDir) -> None:
        self.follower = LegFollower({p.name: files.conn_log(p.name) for p in plan.processes if p.kind in PROXY_KINDS})
        self.legs: list[ConnLeg] = []

    @property
    def skipped(self) -> int:
        return self.follower.skipped

    def poll(self) -> None:
        self.legs += map(ConnLeg.from_dict, self.follower.poll())

    def by_src(self, src: str) -> ConnLeg | None:
        return next((x for x in self.legs if x.src == src), None)


# ---- following the request ------------------------------------------------------------------------
def _ep(ip: str, port: int) -> str:
    return f"{ip}:{port}"


class _Sightings:
    """SYN sightings grouped by the leg's source endpoint (the join key: NAT and TPROXY rewrite
    destinations, never sources, and spoofing proxies keep the source IP but pick a new port)."""

    def __init__(self) -> None:
        self.by_src: dict[str, list[tuple[Any, Seg]]] = {}
        self.seen = 0

    def feed(self, frames: list[Any]) -> None:
        """Take frames not fed before (``Capture.since(self.seen)``, or all of them once)."""
        for c in frames:
            seg = parse_frame(c.raw)
            if seg is not None and seg.is_syn:
                self.by_src.setdefault(_ep(seg.src, seg.sport), []).append((c, seg))
        self.seen += len(frames)

    def of(self, src: str) -> list[tuple[Any, Seg]]:
        """First sighting per (netns, iface, direction): SYN retransmissions add nothing."""
        out, keys = [], set()
        for c, seg in sorted(self.by_src.get(src, []), key=lambda x: x[0].timestamp_ns):
            k = (c.netns, c.iface, c.direction, seg.encap is not None)
            if k not in keys:
                keys.add(k)
                out.append((c, seg))
        return out


def _reached_app(geo: Geography, dp: datapaths.Datapath, sightings: list[tuple[Any, Seg]]) -> bool:
    """Positive evidence that a leg ended at an application: its SYN entered a pod that has no
    proxy, or the loopback of a sidecar pod from the sidecar's inbound address 127.0.0.6. (Absence
    of a proxy line proves nothing: the capture thread may simply not have read the frame yet.)"""
    for c, seg in sightings:
        if c.direction != "in" or seg.encap is not None:
            continue
        place = geo.place(c.netns)
        if dp.reaches_app(place, c.iface, seg.dport):
            return True
        if place.kind == "pod" and c.iface == "lo" and seg.src == "127.0.0.6":
            return True
    return False


def trace(lab: LabView, src_pod: str, dst: str, url: str | None = None, *,
          contract: str | RequestPath | None = None, timeout: float = 5.0) -> TraceResult:
    """Send one tagged GET from ``src_pod`` to ``dst`` and reconstruct its hops (see module doc).

    ``contract``: a path name of the lab's topology, a :class:`RequestPath`, or None to pick the
    path whose from/to equal this trace's. ``lab``: a running lab (:class:`netlab.lab.Lab`).
    ``netlab trace`` exits 1 when the result's ``matched`` is False.
    """
    t0 = time.monotonic()
    plan: Plan = lab.plan
    pod = lab.pod(src_pod)
    path = _contract_for(plan, contract, pod.ref, dst)
    if url is None:
        url = path.url if path is not None else "/"
    ip, port, host = resolve_dst(plan, dst)
    trace_id = uuid.uuid4().hex[:12]
    status, body, err = 0, "", ""

    def send(geo: Geography, cap: Capture, legs: LegLog) -> Followed:
        nonlocal status, body, err
        sock, sport = open_client(pod)
        status, body, err = http_get(sock, ip, port, host, url, trace_id, timeout)
        return _follow(geo, cap, legs, _ep(pod.ip, sport), deadline=time.monotonic() + LEG_WAIT)

    hops, notes, legs = observe(lab, send, ip, port, "netlab-trace")
    if legs.skipped:
        notes.append(f"skipped {legs.skipped} line{'s' if legs.skipped != 1 else ''} of the connection logs "
                     f"({StateDir(lab.state_dir).conn}) that are not connection legs")
    res = TraceResult(lab.name, trace_id, pod.ref, dst, url, status, body, (time.monotonic() - t0) * 1000, hops,
                      contract=path, error=err, notes=notes)
    _judge(res)
    return res


Followed = tuple[list[tuple[str, ConnLeg | None]], list[str]]  # (the leg chain, notes) of _follow


def observe(lab: LabView, send: Callable[[Geography, Capture, LegLog], Followed], first_ip: str, first_port: int,
            thread_name: str) -> tuple[list[ObservedHop], list[str], LegLog]:
    """What a request and a probe trace share: snapshot the rule counters, open the connection
    logs, capture every lab interface while ``send`` sends and follows the request's legs, snapshot
    again and build the hops (with a note per proxy denial). -> (hops, notes, the legs read)."""
    plan: Plan = lab.plan
    geo = Geography(plan)
    ipt_ns = sorted({r.netns for r in plan.ipt_rules})
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=thread_name)
    try:
        before, saves = _snapshot(plan, ipt_ns, pool)
        legs = LegLog(plan, StateDir(lab.state_dir))
        cap = Capture(geo.targets(), bpf=BPF_SYN_OR_GENEVE, skip_missing=True).start()
        try:
            chain, notes = send(geo, cap, legs)
        finally:
            frames = cap.stop()
        after, _ = _snapshot(plan, ipt_ns, pool)
        sights = _Sightings()
        sights.feed(frames)
        hops = _build_hops(plan, geo, sights, chain, first_ip, first_port, before, after, saves, pool)
    finally:
        pool.shutdown(wait=True)
    for h in hops:
        denial = _denial(h.proxy) if h.kind == "proxy" and h.proxy else None
        if denial:
            notes.append(denial)
    return hops, notes, legs


def _snapshot(plan: Plan, namespaces: list[str], pool: ThreadPoolExecutor) -> tuple[Counters, dict[str, str]]:
    """(netns, ref) -> packets, and each namespace's iptables-save text, read in parallel."""
    futs = [pool.submit(iptsim.read_counters, plan, ns) for ns in namespaces]
    merged: dict[str, int] = {}
    texts: dict[str, str] = {}
    for f in futs:
        ns, counters, text = f.result()
        merged.update(counters)
        texts[ns] = text
    return iptsim.ref_counters(plan, merged), texts


def _contract_for(plan: Plan, contract: str | RequestPath | None, src: str, dst: str) -> RequestPath | None:
    if isinstance(contract, RequestPath):
        return contract
    try:
        return find_contract(plan_contracts(plan), name=contract, src=src, dst=dst)
    except KeyError as e:
        raise UsageError(f"--contract: {e.args[0]}") from None


def _follow(geo: Geography, cap: Capture, legs: LegLog, first: str,
            deadline: float) -> tuple[list[tuple[str, ConnLeg | None]], list[str]]:
    """Walk leg by leg: SYN sightings of ``src``, then the proxy line whose downstream source is
    ``src``, then that proxy's upstream source, ... until a leg ends at an application."""
    chain: list[tuple[str, ConnLeg | None]] = []
    notes: list[str] = []
    sights = _Sightings()
    dp = datapaths.of(geo.plan)
    src: str | None = first
    visited: set[str] = set()
    while src is not None and src not in visited:
        visited.add(src)
        while True:
            legs.poll()
            leg = legs.by_src(src)
            if leg is not None:
                break
            sights.feed(cap.since(sights.seen))
            if _reached_app(geo, dp, sights.of(src)):
                break
            if time.monotonic() > deadline:
                notes.append(f"the leg from {src} reached neither an application nor a proxy's connection log "
                             f"within {LEG_WAIT:.1f} s")
                break
            time.sleep(0.005)
        chain.append((src, leg))
        src = (leg.up_src or None) if leg else None
    return chain, notes


# ---- building the hop list ---------------------------------------------------------------------
def _proc_ids(plan: Plan, component: str | None) -> tuple[int, int]:
    for p in plan.processes:
        if p.name == component:
            return p.uid, p.gid
    return APP_UID, APP_UID


def _build_hops(plan: Plan, geo: Geography, sights: _Sightings, chain: list[tuple[str, ConnLeg | None]],
                first_ip: str, first_port: int, before: Counters, after: Counters, saves: dict[str, str],
                pool: ThreadPoolExecutor) -> list[ObservedHop]:
    hops: list[ObservedHop] = []
    rulesets: dict[str, iptsim.Ruleset] = {}
    route_jobs: list[tuple[ObservedHop, Any]] = []
    prev_leg: ConnLeg | None = None
    dp = datapaths.of(plan)
    for i, (src, leg) in enumerate(chain):
        uid, gid = _proc_ids(plan, prev_leg.component if prev_leg else None)
        orig_dst = prev_leg.up_dst if prev_leg else _ep(first_ip, first_port)
        sender = dp.sender(prev_leg)
        done_ns: set[str] = set()
        sent: dict[str, iptsim.Pkt] = {}  # netns -> the SYN as its OUTPUT left it, if sent over lo
        seen = sights.of(src)
        for c, seg in seen:
            place = geo.place(c.netns)
            h = ObservedHop("packet", c.timestamp, place.at, c.netns, place.node, _ep(seg.src, seg.sport),
                            _ep(seg.dst, seg.dport), iface=c.iface, iface_sym=geo.iface_sym(c.netns, c.iface),
                            dir=c.direction, proto="hbone" if seg.dport == 15008 else "tcp", leg=i)
            tun = geo.tunnels.get((c.netns, c.iface))
            if seg.encap is not None:
                h.encap = dict(seg.encap)
                h.what = "Geneve frame carrying the SYN"
            elif tun is not None:
                h.encap = {"type": "geneve", "vni": tun.vni, "outer_src": None, "outer_dst": tun.remote}
                h.what = f"tunnel device (VNI {tun.vni}, remote {tun.remote})"
            if seg.encap is None and c.netns not in done_ns and c.netns in geo.places:
                job = _evaluate(plan, geo, rulesets, saves, h, seg, uid, gid, orig_dst, pool, sender, sent)
                if job is not None:
                    route_jobs.append((h, job))
                if h.dir == "in" or c.iface != "lo" or h.rules:
                    done_ns.add(c.netns)
            elif c.iface == "lo" and h.dir == "in" and c.netns in sent:  # the same SYN back in over lo
                reply = dp.looped(rulesets[c.netns], h, sent.pop(c.netns), pool)
                if reply is not None:
                    route_jobs.append((h, (None, reply)))
            hops.append(h)
        if leg is not None:
            netns = dp.proxy_netns(leg)
            place = geo.place(netns)
            proxy: dict[str, Any] = {k: getattr(leg, k) for k in _PROXY_FIELDS}
            proxy["extra"] = leg.extra or None
            ph = ObservedHop("proxy", float(leg.start), place.at, netns, place.node, leg.src, leg.orig_dst,
                             proto=leg.proto, leg=i, proxy=proxy)
            ph.what = f"{leg.component} {leg.listener}"
            denial = _denial(proxy)
            if denial:
                ph.what += f": {denial}"
            hops.append(ph)
        prev_leg = leg
    # the 5-ish `ip route get` calls run in parallel; then confirm simulated rules by counters
    for h, (pkt, fut) in route_jobs:
        ans: iptsim.RouteAnswer = fut.result()
        h.table, h.route = ans.table, ans.text if pkt is not None else f"replies: {ans.text}"
        if pkt is not None:
            _after_routing(rulesets[h.netns], h, pkt, ans)
    _fill_tunnel_outer(hops)
    for h in hops:
        sim, h.rules = h.rules, []
        for ref in sim:
            moved = after.get((h.netns, ref), 0) - before.get((h.netns, ref), 0)
            (h.rules if moved > 0 or (h.netns, ref) not in after else h.rules_unconfirmed).append(ref)
    for n, h in enumerate(hops, 1):
        h.n = n
    return hops


#: What a proxy hop carries of its leg (``TraceResult.to_dict``: ``hops[].proxy``)
_PROXY_FIELDS = ("component", "listener", "local", "up_src", "up_dst", "proto", "authority", "src_id", "dst_id",
                 "outcome")


def _denial(leg: dict[str, Any]) -> str | None:
    """"denied by policy X" for a leg ztunnel refused on authorization grounds (docs/policies.md);
    ``leg``: a proxy hop's ``proxy``."""
    extra = leg.get("extra") or {}
    if extra.get("reason") != "Denied":
        return None
    why = f"policy {extra['policy']}" if extra.get("policy") else "authorization"
    return f"DENIED by {why} ({extra.get('rbac', 'rbac')}) at {leg.get('component')} {leg.get('listener')}: {leg.get('outcome')}"


def _evaluate(plan: Plan, geo: Geography, rulesets: dict[str, iptsim.Ruleset], saves: dict[str, str], h: ObservedHop, seg: Seg,
              uid: int, gid: int, orig_dst: str, pool: ThreadPoolExecutor, sender: tuple[str, int],
              sent: dict[str, iptsim.Pkt]) -> Any:
    """Replay the namespace's hooks for this SYN: received (PREROUTING, route, FORWARD/INPUT,
    POSTROUTING) or sent by a local process (OUTPUT, POSTROUTING; ``sender``: the netns and
    SO_MARK of a proxy socket whose source is not local, :meth:`Datapath.sender`; a SYN sent
    over lo is kept in ``sent`` for its way back in). Returns a route future or None."""
    ns = h.netns
    rs = rulesets.get(ns)
    if rs is None:
        rs = rulesets[ns] = iptsim.Ruleset.from_save(plan, ns, saves.get(ns, ""))
    place = geo.place(ns)
    hits: list[str] = []
    locally_sent = h.dir == "out" and (seg.src in geo.local_ips.get(ns, set()) | {"127.0.0.6"} or ns == sender[0])
    if h.dir == "in" and h.iface != "lo":
        p = iptsim.Pkt(iif=h.iface, oif=None, src=seg.src, dst=seg.dst, dport=seg.dport)
        v = rs.run("mangle", "PREROUTING", p, hits)
        if v not in ("tproxy",):
            rs.run("nat", "PREROUTING", p, hits)
        h.mark = p.mark or None
        h.rules = hits
        if place.kind in ("node", "ztunnel"):
            if (p.dst, p.dport) != (seg.dst, seg.dport) and v != "tproxy":
                h.what = (h.what + "; " if h.what else "") + f"DNAT to {p.dst}:{p.dport}"
            return p, pool.submit(iptsim.route_get, plan, ns, p.dst, seg.src, h.iface or "", p.mark)
        return None
    if locally_sent:
        odip, _, odport = orig_dst.rpartition(":")
        oif = "lo" if odip.startswith("127.") or odip in geo.local_ips.get(ns, set()) else (h.iface if h.iface != "lo" else "eth0")
        p = iptsim.Pkt(iif=None, oif=oif, src=seg.src, dst=odip or seg.dst,
                       dport=int(odport) if odport.isdigit() else seg.dport, uid=uid, gid=gid,
                       mark=sender[1] if ns == sender[0] else 0)
        rs.run("mangle", "OUTPUT", p, hits)
        rs.run("nat", "OUTPUT", p, hits)
        h.mark = p.mark or None
        h.rules = hits
        if h.iface == "lo":
            sent[ns] = p
    return None


def _after_routing(rs: iptsim.Ruleset, h: ObservedHop, p: iptsim.Pkt, ans: iptsim.RouteAnswer) -> None:
    """The hooks after the routing decision: INPUT for local delivery, else FORWARD and
    POSTROUTING with the chosen output device (where ztunnel-FORWARD saves the connmark)."""
    if ans.table is None:
        return
    if ans.local:
        rs.run("mangle", "INPUT", p, h.rules)
    else:
        p.oif = ans.oif
        rs.run("mangle", "FORWARD", p, h.rules)
        rs.run("mangle", "POSTROUTING", p, h.rules)
        rs.run("nat", "POSTROUTING", p, h.rules)


def _fill_tunnel_outer(hops: list[ObservedHop]) -> None:
    """A tunnel device shows the inner frame; take the outer addresses from the Geneve frame of
    the same leg and VNI seen on the underlay veth."""
    for h in hops:
        e = h.encap
        if h.kind != "packet" or not e or e.get("outer_src"):
            continue
        for g in hops:
            if g.leg == h.leg and g.iface_sym != h.iface_sym and g.encap and g.encap.get("outer_src") \
                    and g.encap.get("vni") == e.get("vni"):
                e["outer_src"], e["outer_dst"] = g.encap["outer_src"], g.encap["outer_dst"]
                break


def _judge(res: TraceResult) -> None:
    path = res.contract
    if path is None:
        return
    if not path.hops:
        res.notes.append(f"path {path.name} declares no hops: nothing to compare")
        return
    m = match(path.hops, res.hops)
    res.divergence = m.divergence
    if m.ok and res.status != path.expect_status:
        res.error = res.error or f"HTTP status {res.status}, contract expects {path.expect_status}"
    elif m.ok and path.expect_body and path.expect_body not in res.body:
        res.error = f"response body lacks {path.expect_body!r}"


__all__ = ["TraceResult", "describe", "resolve_dst", "trace"]
