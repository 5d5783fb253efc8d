"""Bad input: hypothesis mutates the shipped topologies (wrong types, unknown keys, dangling refs,
duplicates, bad CIDRs, overlong names, non-UTF-8 / garbage YAML) and feeds them to `netlab plan`
(in-process, through ``netlab.cli.main``, so hundreds of cases stay fast) and, a few, as real
`netlab plan` / `netlab up` subprocesses.

Contract (netlab.cli docstring): a bad file ends as exactly one line on stderr that names the file,
exit status 2, no traceback, and nothing created. A mutation that is not necessarily invalid
(e.g. a wrong type where YAML coercion makes it valid again) may also plan fine (exit 0).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netlab import cli
from netlab.topology.load import topologies_dir

SEEDS = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(topologies_dir().glob("*.yaml"))}
NETLAB = [sys.executable, "-m", "netlab.cli"]

WRONG_VALUES = st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.booleans(), st.none(),
                         st.text(max_size=20), st.lists(st.integers(), max_size=3),
                         st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
BAD_CIDRS = ["10.0.0.1/24", "300.1.1.0/24", "10.0.0.0/33", "10.0.0.0/-1", "::/0", "fe80::/64", "10.0.0.0",
             "10.0.0.0/30", "abc", "", "10.0.0.0/24/8", "0.0.0.0/0x", "10.0.0.0 /24", "1e3.0.0.0/8"]


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (container path) in a YAML tree: dicts and lists, including the root ()."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)):
                out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, (dict, list)):
                out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """(what was done, file bytes, must_fail). ``must_fail`` is True when the mutation makes the
    topology invalid whatever else holds."""
    seed = draw(st.sampled_from(sorted(SEEDS)))
    t = copy.deepcopy(SEEDS[seed])
    kind = draw(st.sampled_from(["wrong_type", "unknown_key", "drop_key", "dangling", "duplicate", "bad_cidr",
                                 "overlong", "garbage", "bad_port", "bad_label"]))
    must_fail = True
    if kind == "wrong_type":
        containers = [p for p in _paths(t) if isinstance(_get(t, p), dict) and _get(t, p)]
        path = draw(st.sampled_from(containers))
        d = _get(t, path)
        key = draw(st.sampled_from(sorted(d, key=str)))
        d[key] = draw(WRONG_VALUES)
        must_fail = False  # "description: 5" or "labels: {}" may still be valid
        what = f"{seed}: {path + (key,)} = {d[key]!r}"
    elif kind == "unknown_key":
        containers = [p for p in _paths(t) if isinstance(_get(t, p), dict)
                      and not (p and p[-1] in ("labels", "annotations", "selector", "namespaces"))]
        path = draw(st.sampled_from(containers))
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in _get(t, path)))
        _get(t, path)[key] = draw(WRONG_VALUES)
        what = f"{seed}: unknown key {path + (key,)}"
    elif kind == "drop_key":
        required = [(p, k) for p in _paths(t) if isinstance(_get(t, p), dict) for k in ("name", "nodes", "namespace",
                    "node", "port") if k in _get(t, p) and not (p and p[-1] in ("labels", "selector", "namespaces"))
                    and not (p[:1] == ("waypoints",) and k == "name") and not (p[:1] == ("paths",) and k == "port")]
        path, key = draw(st.sampled_from(required))
        del _get(t, path)[key]
        what = f"{seed}: dropped {path + (key,)}"
    elif kind == "dangling":
        choices = ([("pods", i, "node") for i in range(len(t.get("pods", [])))]
                   + [("pods", i, "namespace") for i in range(len(t.get("pods", [])))]
                   + [("services", i, "namespace") for i in range(len(t.get("services", [])))]
                   + [("waypoints", i, "node") for i in range(len(t.get("waypoints", [])))]
                   + [("paths", i, "from") for i in range(len(t.get("paths", [])))])
        path = draw(st.sampled_from(choices))
        _get(t, path[:-1])[path[-1]] = draw(st.sampled_from(["nowhere", "node-zz", "ghost/pod", "x"]))
        what = f"{seed}: dangling {path}"
    elif kind == "duplicate":
        lists = [k for k in ("nodes", "pods", "services", "waypoints") if t.get(k)]
        k = draw(st.sampled_from(lists))
        t[k].append(copy.deepcopy(draw(st.sampled_from(t[k]))))
        what = f"{seed}: duplicate in {k}"
    elif kind == "bad_cidr":
        where = draw(st.sampled_from(["podCidr", "fabric", "serviceCidr"]))
        bad = draw(st.sampled_from(BAD_CIDRS))
        if where == "podCidr":
            t["nodes"][draw(st.integers(0, len(t["nodes"]) - 1))]["podCidr"] = bad
        else:
            t.setdefault("network", {})[where] = bad
            must_fail = bad not in ("10.0.0.0", "10.0.0.0/30")  # a /32 or /30 fabric/service range can be fine
        what = f"{seed}: {where} = {bad!r}"
    elif kind == "overlong":
        n = draw(st.integers(64, 400))
        name = "a" * n
        target = draw(st.sampled_from(["name", "node", "pod", "service", "namespace"]))
        if target == "name":
            t["name"] = name
        elif target == "node":
            t["nodes"][0]["name"] = name[:draw(st.integers(16, n))]
        elif target == "pod" and t.get("pods"):
            t["pods"][0]["name"] = name
        elif target == "service" and t.get("services"):
            t["services"][0]["name"] = name
        else:
            t["namespaces"] = {**t.get("namespaces", {}), name: {}}
        what = f"{seed}: overlong {target} ({n})"
    elif kind == "bad_port":
        target = draw(st.sampled_from(["pod", "service"]))
        port = draw(st.sampled_from([0, -1, 65536, 10**12, 15008, 15001]))
        if target == "pod" and any(p.get("ports") for p in t.get("pods", [])):
            next(p for p in t["pods"] if p.get("ports"))["ports"] = [port]
        elif t.get("services"):
            t["services"][0]["port"] = port if port not in (15008, 15001) else 0
        else:
            t["nodes"][0]["podCidr"] = port
        what = f"{seed}: {target} port {port}"
    elif kind == "bad_label":
        target = draw(st.sampled_from(["pod", "namespace", "node"]))
        bad = draw(st.sampled_from(["UPPER", "-lead", "trail-", "under_score", "dot.ted", "sp ace", "é", "a/b"]))
        if target == "pod" and t.get("pods"):
            t["pods"][0]["name"] = bad
        elif target == "node":
            t["nodes"][0]["name"] = bad
        else:
            t["namespaces"] = {**t.get("namespaces", {}), bad: {}}
        what = f"{seed}: bad {target} name {bad!r}"
    else:  # garbage
        how = draw(st.sampled_from(["bytes", "non_utf8", "truncate", "not_mapping", "yaml_error"]))
        text = yaml.safe_dump(t).encode()
        if how == "bytes":
            data = draw(st.binary(min_size=1, max_size=200))
        elif how == "non_utf8":
            pos = draw(st.integers(0, len(text)))
            data = text[:pos] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"])) + text[pos:]
        elif how == "truncate":
            data = text[:draw(st.integers(0, len(text) - 1))]
            must_fail = False  # a cut at a line end may leave a valid file
        elif how == "not_mapping":
            data = draw(st.sampled_from([b"[]", b"- a\n- b\n", b"42", b"'x'", b"null", b"~", b""]))
        else:
            data = draw(st.sampled_from([b"name: [\n", b"{a: b", b"name: x\n  nodes: y\n", b"\t- x", b"*undefined",
                                         b"a: !!python/object:os.system x", b"a: &x [*x]\n", b"%YAML 9.9\n---\n"]))
        if how == "bytes":
            must_fail = False  # random bytes are almost always bad; "a: b" happens to be only "bad"
        return f"{seed}: garbage/{how}", data, must_fail
    return what, yaml.safe_dump(t, allow_unicode=True).encode(), must_fail


def _plan_inprocess(path: Path) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli.main(["plan", str(path)])
        except SystemExit as e:  # argparse
            rc = int(e.code or 0)
    return rc, err.getvalue()


def check_one_line(rc: int, stderr: str, path: Path, what: str, cmd: str = "plan") -> None:
    assert "Traceback" not in stderr, f"{what}: traceback:\n{stderr}"
    assert rc == 2, f"{what}: exit {rc}, stderr {stderr!r}"
    lines = stderr.rstrip("\n").split("\n")
    assert len(lines) == 1, f"{what}: {len(lines)} lines on stderr: {stderr!r}"
    assert lines[0].startswith(f"netlab {cmd}: "), f"{what}: {lines[0]!r}"
    assert str(path) in lines[0] or path.name in lines[0], f"{what}: file not named: {lines[0]!r}"


@settings(max_examples=int(os.environ.get("NETLAB_FUZZ_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated())
def test_mutated_topology_gives_one_line_and_exit_2(case: tuple[str, bytes, bool], tmp_path: Path) -> None:
    what, data, must_fail = case
    f = tmp_path / "mutant.yaml"
    f.write_bytes(data)
    rc, stderr = _plan_inprocess(f)
    if rc == 0 and not must_fail:
        return  # the mutation happened to leave a valid topology
    check_one_line(rc, stderr, f, what)


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_seed_topologies_are_valid(seed: str) -> None:
    rc, stderr = _plan_inprocess(topologies_dir() / f"{seed}.yaml")
    assert rc == 0 and stderr == "", stderr


# a fixed handful as real processes: the same contract seen from a shell
FIXED = {
    "non_utf8": b"name: x\nnodes: [{name: a}]\n\xff\xfe\n",
    "unknown_key": b"name: x\nnodes: [{name: a, color: red}]\n",
    "dangling": b"name: x\nnodes: [{name: a}]\nnamespaces: {foo: {}}\npods: [{name: p, namespace: foo, node: b}]\n",
    "dup_node": b"name: x\nnodes: [{name: a}, {name: a}]\n",
    "bad_cidr": b"name: x\nnodes: [{name: a, podCidr: 10.0.0.1/24}]\n",
    "overlong": b"name: x\nnodes: [{name: " + b"n" * 300 + b"}]\n",
    "yaml_error": b"name: [\n",
    "wrong_type": b"name: x\nnodes: {name: a}\n",
}


@pytest.mark.parametrize("case", sorted(FIXED))
def test_plan_subprocess_one_line(case: str, tmp_path: Path) -> None:
    f = tmp_path / f"{case}.yaml"
    f.write_bytes(FIXED[case])
    r = subprocess.run([*NETLAB, "plan", str(f)], capture_output=True, text=True, timeout=60)
    check_one_line(r.returncode, r.stderr, f, case)


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (`netlab up`)")
@pytest.mark.parametrize("case", ["non_utf8", "dangling", "bad_cidr", "overlong", "yaml_error"])
def test_up_subprocess_one_line_and_nothing_created(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from netlab import netns as ns

    run = tmp_path / "run"
    monkeypatch.setenv("NETLAB_RUN_DIR", str(run))
    f = tmp_path / f"{case}.yaml"
    f.write_bytes(FIXED[case])
    before = ns.list_netns()
    etc_before = sorted(os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else []
    r = subprocess.run([*NETLAB, "up", str(f), "--name", "hxfuzz", "-q"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "NETLAB_RUN_DIR": str(run)})
    check_one_line(r.returncode, r.stderr, f, case, cmd="up")
    assert [n for n in ns.list_netns() if n.startswith("hxfuzz")] == []
    assert set(ns.list_netns()) <= set(before)
    assert not (run / "hxfuzz").exists()
    assert (sorted(os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else []) == etc_before
