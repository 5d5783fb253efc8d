"""Dependencies inside netlab point one way, and no two packages import each other.

The layers, lowest first (README, Architecture)::

    shared utilities (errors, names, istio, netns, state, testhooks, child_setup)
      -> topology -> plan -> kernel -> runtime / mesh (with geneve, apps, stats)
      -> verify (with export, doctor) -> lab -> cli (with web)

A module may import from its own layer or any lower one, never from a higher one. Every import
counts, also one inside a function (a lazy import is still a dependency: it only moves the
failure to run time). A unit is a subpackage of netlab (``netlab.kernel``) or a module directly
under it (``netlab.state``); between units, no import cycle either, within a layer too.

The bare root package is not a unit: ``import netlab`` (runtime/spawn and runtime/mountview do,
for ``netlab.__path__``) depends on nothing, since every ``import netlab.x`` runs
``netlab/__init__.py`` anyway; that file is the API's facade (``netlab.Lab``, imported lazily) and
sits with ``lab``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "netlab"

LAYERS: list[tuple[str, set[str]]] = [
    ("shared utilities", {"errors", "names", "istio", "netns", "state", "testhooks", "child_setup"}),
    ("topology", {"topology"}),
    ("plan", {"plan"}),
    ("kernel", {"kernel"}),
    # the lab's processes and what starts them: the supervisor, the mesh's proxies, the userspace
    # Geneve relay, the sample apps; stats reads the supervisor's records
    ("runtime/mesh", {"runtime", "mesh", "geneve", "apps", "stats"}),
    # looking at a plan or a running lab from the outside: trace, capture, diagrams; the export
    # of a topology for a real cluster; the kernel feature checks
    ("verify", {"verify", "export", "doctor"}),
    ("lab", {"lab", "__init__"}),
    # the front ends: the command line, and `netlab ui` (a local web view over the lab API)
    ("cli", {"cli", "web"}),
]

#: Deliberate exceptions: (importing module, imported module) -> why. Keep it empty if you can.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("netlab.verify.diagram", "netlab.lab"):
        "diagram.plan_for looks a lab up by name (`netlab diagram LAB|TOPOLOGY`); issue 21 reworks "
        "diagram.py (its helper owns it): the CLI should attach the lab and pass it in, as for trace",
}

RANK = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str | None:
    """``netlab.kernel.apply`` -> ``kernel``; ``netlab.state`` -> ``state``; the root -> None."""
    parts = module.split(".")
    if parts[0] != "netlab" or len(parts) == 1:
        return None
    return parts[1]


def _exists(module: str) -> bool:
    p = PKG.parent.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported netlab module, line) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("netlab.")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            if base != "netlab" and not base.startswith("netlab."):
                continue
            for a in node.names:  # `from netlab import netns`: the submodule, if it is one
                sub = f"{base}.{a.name}"
                out.append((sub if _exists(sub) else base, node.lineno))
    return out


def _edges() -> list[tuple[str, str, str, int]]:
    """(importer module, imported module, importer file, line) between different units."""
    edges = []
    for path in sorted(PKG.rglob("*.py")):
        module = _module_name(path)
        here = _unit(module) or "__init__"
        for target, line in _imports(path, module):
            there = _unit(target)
            if there is not None and there != here:
                edges.append((module, target, str(path.relative_to(PKG.parent)), line))
    return edges


def test_every_unit_has_a_layer() -> None:
    units = {_unit(_module_name(p)) or "__init__" for p in PKG.rglob("*.py")}
    assert units - set(RANK) == set(), "give these a layer in LAYERS (and in README's Architecture)"


def test_imports_point_down() -> None:
    wrong = []
    for src, dst, where, line in _edges():
        a, b = _unit(src) or "__init__", _unit(dst) or "__init__"
        if RANK[b] > RANK[a] and (src, dst) not in EXCEPTIONS:
            wrong.append(f"{where}:{line}: {src} ({LAYERS[RANK[a]][0]}) imports {dst} ({LAYERS[RANK[b]][0]})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycle_between_units() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst, _, _ in _edges():
        if (src, dst) not in EXCEPTIONS:
            graph[_unit(src) or "__init__"].add(_unit(dst) or "__init__")
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert not cycles, f"units that import each other: {cycles}"


def test_exceptions_are_still_needed() -> None:
    """An exception whose import is gone must leave the list (so the list stays honest)."""
    present = {(src, dst) for src, dst, _, _ in _edges()}
    assert set(EXCEPTIONS) <= present, f"no longer needed: {set(EXCEPTIONS) - present}"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return out
