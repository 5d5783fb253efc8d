"""The rule-blob cache of netlab.kernel.ipt: a rule copied from the cache is the rule built anew.

An in-pod lab installs the same rules in every pod; ipt builds each distinct rule once and copies
its kernel blob after that (issue 24). What a second netns gets from the cache must be what
iptables-save shows for the first, built from its options, and a ``-m set`` rule (its blob names
a set by its index in one netns) must never come from the cache.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from netlab import netns as ns
from netlab.kernel import ipt

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

RULES = [("mangle", "PREROUTING", "-p tcp -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff"),
         ("mangle", "HT_CHAIN", "-p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 "
                                "--tproxy-mark 0x111/0xfff"),
         ("mangle", "HT_CHAIN", "-d 10.0.0.0/8 -m comment --comment \"a comment\" -j RETURN"),
         ("nat", "HT_OUT", "-d 127.0.0.1/32 -p tcp -j RETURN"),
         ("nat", "HT_OUT", "-p tcp -j REDIRECT --to-ports 15001")]


@pytest.fixture
def two() -> Iterator[tuple[str, str]]:
    names = ("hb-1", "hb-2")
    for n in names:
        ns.delete_netns(n)
        ns.create_netns(n)
    try:
        yield names
    finally:
        for n in names:
            ns.delete_netns(n)


def install(netns: str) -> None:
    with ns.in_netns(netns), ipt.locked():
        cookie = ns.current_cookie()
        for table in ("mangle", "nat"):
            tx = ipt.TableTx(table, cookie, netns)
            chains = sorted({c for t, c, _ in RULES if t == table and c.startswith("HT_")})
            for c in chains:
                tx.create_chain(c)
                tx.insert_jump("PREROUTING" if table == "mangle" else "OUTPUT", c)
            for t, c, spec in RULES:
                if t == table:
                    tx.append(c, spec)
            tx.commit()
            tx.close()


def saved(netns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, "iptables-legacy-save"], capture_output=True, text=True,
                         check=True).stdout
    return [ln for ln in out.splitlines() if not ln.startswith("#")]


def test_cached_blob_is_the_built_rule(two: tuple[str, str]) -> None:
    ipt._BLOBS.clear()
    install(two[0])  # built from the options, blobs cached
    assert {spec for _, spec, _ in ipt._BLOBS} >= {spec for _, _, spec in RULES}
    install(two[1])  # every rule and jump from the cache
    first = saved(two[0])
    assert first == saved(two[1])
    assert "-A HT_CHAIN -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 " \
           "--tproxy-mark 0x111/0xfff" in first and "-A OUTPUT -j HT_OUT" in first


def test_set_rules_are_never_cached() -> None:
    assert not ipt._cacheable("-m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127")
    assert ipt._cacheable("-p tcp -j REDIRECT --to-ports 15001")
