"""Load a topology file and turn every way it can be wrong into one line naming file and field."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from netlab.errors import TopologyError
from netlab.topology import yaml_input
from netlab.topology.model import Topology

MAX_FILE_BYTES = 16 << 20  # a 1,000-pod topology is about 100 KiB

_FRIENDLY = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def topologies_dir() -> Path:
    """Where named topologies live: $NETLAB_TOPOLOGIES, else the repo's ``topologies/``."""
    env = os.environ.get("NETLAB_TOPOLOGIES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "topologies"


def available() -> list[tuple[str, str]]:
    """(name, description) of every topology in :func:`topologies_dir`, sorted by name."""
    out = []
    for p in sorted(topologies_dir().glob("*.yaml")):
        try:
            out.append((p.stem, load_topology(p).description.strip().splitlines()[0] if load_topology(p).description else ""))
        except TopologyError as e:
            out.append((p.stem, f"(invalid: {e})"))
    return out


def resolve(ref: str | os.PathLike[str]) -> Path:
    """A topology name from ``topologies/`` or a path to a YAML file."""
    p = Path(ref)
    if str(ref) == "":
        raise TopologyError("TOPOLOGY is empty: give a name from `netlab list` or a path to a YAML file")
    if p.suffix in (".yaml", ".yml") or os.sep in str(ref):
        if p.is_dir():
            raise TopologyError(f"{p}: is a directory, not a topology file")
        if not p.is_file():
            raise TopologyError(f"{p}: no such topology file")
        return p
    named = topologies_dir() / f"{ref}.yaml"
    if named.is_file():
        return named
    if p.is_file():
        return p
    if p.is_dir():
        raise TopologyError(f"{p}: is a directory, not a topology file (and not one of the names of `netlab list`)")
    names = ", ".join(n for n, _ in available()) or "none"
    raise TopologyError(f"{ref}: no such topology (not a file, and not one of: {names})")


def _loc(loc: tuple[int | str, ...]) -> str:
    return yaml_input.field_path(p if isinstance(p, int) else str(p) for p in loc) or "(top level)"


def _printable(text: str, limit: int = 60) -> str:
    """Keys come from the user's file: keep the error on one line whatever they contain."""
    r = text if text.isprintable() else repr(text)
    return r if len(r) <= limit else r[:limit] + ".."


def load_topology(ref: str | os.PathLike[str]) -> Topology:
    path = resolve(ref)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise TopologyError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB; not a topology")
        data = yaml_input.load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TopologyError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except yaml_input.YamlInputError as e:
        where = f":{e.mark.line + 1}:{e.mark.column + 1}" if e.mark else ""
        raise TopologyError(f"{path}{where}: {e.field or '(top level)'}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TopologyError(f"{path}{where}: YAML syntax error: {problem}") from None
    except OSError as e:
        raise TopologyError(f"{path}: cannot read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise TopologyError(f"{path}: expected a mapping at the top level (name, nodes, namespaces, pods, ...), got {type(data).__name__}")
    try:
        return Topology.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = _FRIENDLY.get(err["type"], err["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif err["type"] not in _FRIENDLY and "input" in err and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {_printable(repr(err['input']))})"
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise TopologyError(f"{path}: {_loc(err['loc'])}: {_printable(msg, 300)}{more}") from None
