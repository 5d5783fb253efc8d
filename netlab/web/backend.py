"""What ``netlab ui`` can ask of the labs: list them, describe one, trace one request, hand out the
capture of the last trace. Nothing else: no command, no file path and no free-form address ever
reaches a lab from the browser.

Why every parameter is checked against the plan rather than parsed: the UI runs as root and a
page from any origin (or another local user) may send it requests. A lab must be one that is up,
a source one of the lab's application pods, a destination one of the ``svc.ns:port`` names its
services and paths define — exact strings from lists the server built, nothing interpreted.

The capture of a trace is recorded beside it with the same machinery as ``netlab capture``
(one socket per interface, in its own netns), then cut down to the frames of the trace's own
connections (by their addresses and ports, inside Geneve too), so the pcapng a user downloads
holds that request and nothing else the lab was doing.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from netlab.errors import NetlabError

LAB_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?")
MAX_PARAM = 300


class BadRequest(Exception):
    """A parameter the UI refuses (HTTP 400, or 404 for a lab that is not up; 409 when busy)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def sources(plan: Any) -> list[str]:
    """Pods a trace may start from: application pods (not ztunnel, not waypoints)."""
    return [p.ref for p in plan.pods if p.mode not in ("ztunnel", "waypoint")]


def destinations(plan: Any) -> list[str]:
    """``<svc>.<ns>:<port>`` of every service, then the paths' own ``to`` (as the topology wrote them)."""
    out = [f"{s.name}.{s.namespace}:{s.port}" for s in plan.services]
    out += [p.to for p in plan.paths]
    return list(dict.fromkeys(out))


def pick(value: object, allowed: list[str], what: str) -> str:
    """``value`` if it is exactly one of ``allowed``; else BadRequest naming the field."""
    if not isinstance(value, str) or len(value) > MAX_PARAM or value not in allowed:
        shown = value if isinstance(value, str) and len(value) <= 80 and value.isprintable() else "(invalid)"
        raise BadRequest(f"{what} {shown!r} is not one of this lab's {what}s")
    return value


def _flows(hops: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """Both directions of every (src, dst) endpoint pair the trace saw, proxy legs included."""
    pairs: set[tuple[str, str]] = set()
    for h in hops:
        legs = [(h.get("src"), h.get("dst"))]
        p = h.get("proxy") or {}
        legs.append((p.get("up_src"), p.get("up_dst")))
        for a, b in legs:
            if a and b:
                pairs |= {(str(a), str(b)), (str(b), str(a))}
    return pairs


@dataclass
class LastCapture:
    trace_id: str
    pcapng: bytes
    frames: int


class LabBackend:
    """The real labs on this machine (see module doc); one trace at a time."""

    def __init__(self) -> None:
        self._busy = threading.Lock()
        self._last: dict[str, LastCapture] = {}

    def _lab(self, name: str) -> Any:
        from netlab.lab import Lab

        if not isinstance(name, str) or not LAB_NAME.fullmatch(name) or name not in Lab.running():
            raise BadRequest("no such lab is up", 404)
        try:
            return Lab.attach(name)
        except NetlabError as e:
            raise BadRequest(str(e), 404) from None

    def labs(self) -> list[dict[str, Any]]:
        from netlab.lab import Lab

        out = []
        for name in Lab.running():
            try:
                lab = Lab.attach(name)
                h = lab.health()
                out.append({"name": name, "topology": lab.plan.topology, "tunnel": lab.plan.tunnel,
                            "health": h["health"], "problems": h["problems"]})
            except NetlabError as e:
                out.append({"name": name, "topology": None, "tunnel": None, "health": "broken", "problems": [str(e)]})
        return out

    def view(self, name: str) -> dict[str, Any]:
        from netlab.verify.diagram import figure_svg

        lab = self._lab(name)
        plan = lab.plan
        return {"status": lab.status(), "svg": figure_svg(plan, uid="base"), "sources": sources(plan),
                "destinations": destinations(plan),
                "paths": [{"name": p.name, "from": p.from_, "to": p.to} for p in plan.paths],
                "last_capture": name in self._last}

    def trace(self, name: str, src: object, dst: object) -> dict[str, Any]:
        lab = self._lab(name)
        src = pick(src, sources(lab.plan), "source pod")
        dst = pick(dst, destinations(lab.plan), "destination")
        if not self._busy.acquire(blocking=False):
            raise BadRequest("a trace is running; try again in a moment", 409)
        try:
            d, frames = self._trace_with_capture(lab, src, dst)
        finally:
            self._busy.release()
        from netlab.verify.html import pane_data, pane_html, verdict

        uid = "t" + d["trace_id"][:8]
        return {"trace": d, "pane": pane_html(lab.plan, d, uid=uid, stack=True), "data": pane_data(lab.plan, d, uid),
                "verdict": verdict(d), "capture_frames": frames}

    def _trace_with_capture(self, lab: Any, src: str, dst: str) -> tuple[dict[str, Any], int]:
        from netlab.verify.capture import DEFAULT_FILTER
        from netlab.verify.hops import Geography, parse_frame
        from netlab.verify.pcapng import write_frames
        from netlab.verify.sniff import Capture
        from netlab.verify.trace import trace

        targets = Geography(lab.plan).targets()
        cap = Capture(targets, bpf=DEFAULT_FILTER, skip_missing=True).start()
        try:
            d = trace(lab, src, dst, None).to_dict()
        finally:
            frames = cap.stop(settle=0.2)
        flows = _flows(d.get("hops") or [])
        keep: list[Any] = []  # Captured frames (pcapng.write_frames reads netns, iface, direction, raw)
        for f in frames:
            seg = parse_frame(f.raw)
            if seg is not None and (f"{seg.src}:{seg.sport}", f"{seg.dst}:{seg.dport}") in flows:
                keep.append(f)
        with tempfile.TemporaryDirectory(prefix="netlab-ui-") as tmp:  # 0700, private to root
            path = os.path.join(tmp, "trace.pcapng")
            write_frames(path, keep, list(targets))
            with open(path, "rb") as fh:
                data = fh.read()
        self._last[lab.name] = LastCapture(str(d.get("trace_id")), data, len(keep))
        return d, len(keep)

    def capture(self, name: str) -> LastCapture:
        self._lab(name)
        last = self._last.get(name)
        if last is None:
            raise BadRequest("no trace has been run on this lab from this ui yet", 404)
        return last


__all__ = ["BadRequest", "LabBackend", "LastCapture", "destinations", "pick", "sources"]
