"""The ``iptables-legacy-save`` spelling of a rule, parsed: the form every ``IptRule.spec`` of a
plan is written in (everything after ``-A <chain>``).

Pure (no libiptc, no root): the kernel layer builds ``iptc`` rules from it
(:mod:`netlab.kernel.ipt`) and ``netlab trace`` replays rules with it (:mod:`netlab.verify.iptsim`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field


class IptSpecError(ValueError):
    """A rule spec that is not in the form iptables-legacy-save prints."""


@dataclass
class Opt:
    name: str  # without leading dashes, e.g. "dport"
    args: list[str]
    neg: bool = False


@dataclass
class Ext:
    name: str
    opts: list[Opt] = field(default_factory=list)


@dataclass
class Spec:
    """One rule: its basic matches, its ``-m`` matches and its target, each with their options."""

    src: str | None = None  # "!" prefix when negated, as python-iptables expects
    dst: str | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    proto: str | None = None
    matches: list[Ext] = field(default_factory=list)
    target: Ext | None = None
    goto: bool = False


_BASIC = {"-s": "src", "--source": "src", "-d": "dst", "--destination": "dst",
          "-i": "in_iface", "--in-interface": "in_iface", "-o": "out_iface", "--out-interface": "out_iface",
          "-p": "proto", "--protocol": "proto"}


def parse_spec(spec: str) -> Spec:
    """Parse iptables-save rule arguments (everything after ``-A <chain>``)."""
    toks = shlex.split(spec)
    out = Spec()
    cur: Ext | None = None  # the match or target whose options we are reading
    neg = False
    i = 0
    while i < len(toks):
        t = toks[i]
        if t == "!":
            if neg:
                raise IptSpecError(f"double '!' in {spec!r}")
            neg = True
            i += 1
            continue
        if t in _BASIC:
            if i + 1 >= len(toks):
                raise IptSpecError(f"{t} needs a value in {spec!r}")
            setattr(out, _BASIC[t], ("!" if neg else "") + toks[i + 1])
            neg = False
            i += 2
            continue
        if t in ("-m", "--match"):
            cur = Ext(toks[i + 1])
            out.matches.append(cur)
            i += 2
            continue
        if t in ("-j", "--jump", "-g", "--goto"):
            if out.target is not None:
                raise IptSpecError(f"two targets in {spec!r}")
            cur = out.target = Ext(toks[i + 1])
            out.goto = t in ("-g", "--goto")
            i += 2
            continue
        if t.startswith("--"):
            if cur is None:
                # "-p tcp --dport 80": iptables loads the protocol's match implicitly
                if not out.proto or out.proto.startswith("!"):
                    raise IptSpecError(f"option {t} without a match in {spec!r}")
                cur = Ext(out.proto)
                out.matches.append(cur)
            j = i + 1
            while j < len(toks) and toks[j] != "!" and not toks[j].startswith("-"):
                j += 1
            cur.opts.append(Opt(t[2:], toks[i + 1:j], neg))
            neg = False
            i = j
            continue
        raise IptSpecError(f"unexpected {t!r} in {spec!r}")
    if neg:
        raise IptSpecError(f"dangling '!' in {spec!r}")
    if out.target is None:
        raise IptSpecError(f"no target (-j) in {spec!r}")
    return out
