"""`netlab compare`: one request of a topology through both datapaths, side by side.

Why two real labs and not one plan rendered twice: the point is what a reader of the seed article
must unlearn, and only evidence shows it. Two labs of the same topology are brought up side by
side (``<lab>-1-18`` and ``<lab>-inpod``; every address is the same under both datapaths, the
plan builder sees to that), the same path is traced in each (:func:`netlab.verify.trace.trace`,
each against its own datapath's contract), and the two hop lists are printed next to each other,
rows aligned by the seed's hop numbers. Below them, what disappeared and what appeared, as sets
of facts read off the observed hops: devices crossed, iptables rules that matched (and where),
marks, route tables, proxy listeners. The labs are torn down at the end unless ``keep``.

verify sits below the lab API, so :func:`run` is handed the two operations it needs (bring a lab
up with a datapath, take it down) by the CLI, which passes ``Lab.up`` and ``Lab.down_lab``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from netlab.errors import UsageError
from netlab.istio import DATAPATH_1_18, DATAPATH_INPOD
from netlab.names import check_lab_name
from netlab.topology.load import load_topology
from netlab.verify.hops import ObservedHop
from netlab.verify.labview import LabView
from netlab.verify.trace import TraceResult, trace

#: the two datapaths, in the order they are shown, and the suffix of each one's lab name
SIDES = ((DATAPATH_1_18, "1-18"), (DATAPATH_INPOD, "inpod"))
FACTS = ("devices", "rules", "marks", "tables", "listeners")
CELL = 56  # characters of one side's column


def lab_names(base: str) -> dict[str, str]:
    """``<base>-1-18`` and ``<base>-inpod``, checked as lab names (so a too long base fails early)."""
    try:
        return {dp: check_lab_name(f"{base}-{suffix}") for dp, suffix in SIDES}
    except ValueError as e:
        raise UsageError(f"--name {base!r}: with '-1-18' and '-inpod' added, {e}") from None


def facts(hops: Sequence[ObservedHop]) -> dict[str, set[str]]:
    """What a trace's hops show, as comparable facts (each says where it is)."""
    out: dict[str, set[str]] = {k: set() for k in FACTS}
    for h in hops:
        if h.kind == "proxy":
            out["listeners"].add(f"{h.at} {h.listener_sym}")
            continue
        out["devices"].add(f"{h.at} {h.iface_sym}")
        out["rules"].update(f"{h.at}: {r}" for r in h.rules)
        if h.mark:
            out["marks"].add(f"{h.at} {h.iface_sym} {h.dir}: {h.mark:#x}")
        if h.table is not None:
            route = h.route.split(" -> ")[0]
            out["tables"].add(f"{h.at}: {route} -> table {h.table}")
    return out


def cell(h: ObservedHop) -> str:
    label = f"({h.seed_n})" if h.seed_n else "  ·"
    if h.kind == "proxy":
        s = f"{label:>5} {h.at} {h.listener_sym}"
    else:
        s = f"{label:>5} {h.at} {h.iface_sym} {h.dir} :{h.port}"
    return s if len(s) <= CELL else s[:CELL - 1] + "…"


def _segments(hops: Sequence[ObservedHop]) -> list[tuple[str, list[ObservedHop]]]:
    """Hops grouped by contract number: a group starts at a numbered hop whose number differs
    from the group's; unnumbered hops stay with the group before them ("" before the first)."""
    out: list[tuple[str, list[ObservedHop]]] = []
    for h in hops:
        if h.seed_n and (not out or out[-1][0] != h.seed_n):
            out.append((h.seed_n, [h]))
        elif out:
            out[-1][1].append(h)
        else:
            out.append(("", [h]))
    return out


def side_by_side(left: Sequence[ObservedHop], right: Sequence[ObservedHop]) -> list[tuple[str, str]]:
    """Rows of (left cell, right cell), groups with the same seed number on the same rows."""
    a, b = _segments(left), _segments(right)
    rows: list[tuple[str, str]] = []
    sm = difflib.SequenceMatcher(a=[n for n, _ in a], b=[n for n, _ in b], autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            for (_, ha), (_, hb) in zip(a[i1:i2], b[j1:j2], strict=True):
                la, lb = [cell(h) for h in ha], [cell(h) for h in hb]
                rows += [(la[k] if k < len(la) else "", lb[k] if k < len(lb) else "") for k in range(max(len(la), len(lb)))]
        else:
            rows += [(cell(h), "") for _, hs in a[i1:i2] for h in hs]
            rows += [("", cell(h)) for _, hs in b[j1:j2] for h in hs]
    return rows


@dataclass
class Comparison:
    topology: str
    path: str
    labs: dict[str, str]
    results: dict[str, TraceResult]
    kept: bool = False
    plans: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Both requests followed their own datapath's contract."""
        return all(r.matched is not False for r in self.results.values())

    def changes(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """(disappeared: in 1.18 only, appeared: in inpod only), per kind of fact."""
        old, new = (facts(self.results[dp].hops) for dp, _ in SIDES)
        return ({k: sorted(old[k] - new[k]) for k in FACTS}, {k: sorted(new[k] - old[k]) for k in FACTS})

    def to_dict(self) -> dict[str, Any]:
        gone, came = self.changes()
        old, new = (self.results[dp].hops for dp, _ in SIDES)
        return {"topology": self.topology, "path": self.path, "labs": self.labs, "kept": self.kept, "match": self.ok,
                "traces": {dp: r.to_dict() for dp, r in self.results.items()},
                "rows": [list(r) for r in side_by_side(old, new)], "disappeared": gone, "appeared": came}

    def render(self) -> str:
        r0 = self.results[DATAPATH_1_18]
        lines = [f"compare {self.path} ({self.topology}): {r0.src} -> {r0.dst}{r0.url}"]
        heads = []
        for dp, _ in SIDES:
            r = self.results[dp]
            verdict = "no contract" if r.matched is None else "MATCH" if r.matched else "MISMATCH"
            heads.append(f"{dp} (lab {self.labs[dp]}): HTTP {r.status or '-'}, {verdict}, {len(r.hops)} hops")
        lines.append(f"{heads[0]:<{CELL}} | {heads[1]}")
        lines.append(f"{'-' * CELL}-+-{'-' * CELL}")
        old, new = (self.results[dp].hops for dp, _ in SIDES)
        lines += [f"{a:<{CELL}} | {b}".rstrip() for a, b in side_by_side(old, new)]
        gone, came = self.changes()
        for title, what in ((f"disappeared (only under {DATAPATH_1_18})", gone), (f"appeared (only under {DATAPATH_INPOD})", came)):
            lines.append(f"{title}:")
            for k in FACTS:
                lines += [f"  {k}: {what[k][0]}"] + [f"  {' ' * len(k)}  {x}" for x in what[k][1:]] if what[k] \
                    else [f"  {k}: none"]
        for dp, _ in SIDES:
            r = self.results[dp]
            if r.matched is False:
                lines.append(f"{dp}: contract {r.contract.name if r.contract else '?'}: MISMATCH: {r.divergence or r.error}")
        lines.append("labs kept: " + ", ".join(self.labs.values()) if self.kept else "labs torn down")
        return "\n".join(lines)


def run(topology: str, *, path: str | None, base: str | None, keep: bool,
        up: Callable[[str, str], LabView], down: Callable[[str], object]) -> Comparison:
    """Bring ``topology`` up once per datapath (``up(name, datapath)``), trace ``path`` (a path
    name of the topology; default its first) in each, and take down the labs this call made
    (``down(name)``) unless ``keep``."""
    topo = load_topology(topology)
    if not topo.paths:
        raise UsageError(f"topology {topo.name!r} declares no paths: nothing to compare")
    chosen = next((p for p in topo.paths if p.name == path), None) if path else topo.paths[0]
    if chosen is None:
        raise UsageError(f"--path {path!r}: topology {topo.name!r} has paths {', '.join(p.name for p in topo.paths)}")
    names = lab_names(base or topo.name)
    made: list[str] = []
    results: dict[str, TraceResult] = {}
    plans: dict[str, Any] = {}
    try:
        for dp, _ in SIDES:
            lab = up(names[dp], dp)
            made.append(lab.name)
            plans[dp] = lab.plan
            results[dp] = trace(lab, chosen.from_, chosen.to, chosen.url, contract=chosen.name)
    finally:
        if not keep:
            for name in reversed(made):
                down(name)
    return Comparison(topo.name, chosen.name, names, results, kept=keep, plans=plans)
