"""Table images (netlab.kernel.iptimage): a table written in one ``IPT_SO_SET_REPLACE`` from the
image of the same table libiptc wrote in another netns.

An in-pod lab writes the same mangle, nat and raw tables in every pod (issue 24). The first pod
goes through libiptc and its tables are kept; the next pods get them in one write each. What a
pod gets that way must be what ``iptables-legacy-save`` shows for the first pod, the write must
not take libiptc's path at all, and a table that is not the fresh one the image was written onto
(a rule already there, another policy) must go through libiptc, keeping what was there.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from netlab import netns as ns
from netlab.kernel import ipt, iptimage
from netlab.kernel.netfilter import write_iptables
from netlab.plan.types import IptChain, IptRule

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

CHAINS = [("mangle", "HI_PRERT", "PREROUTING"), ("nat", "HI_OUTPUT", "OUTPUT"), ("raw", "HI_OUTPUT", "OUTPUT")]
RULES = [("mangle", "HI_PRERT", "-m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff"),
         ("nat", "HI_OUTPUT", "-d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT"),
         ("nat", "HI_OUTPUT", "! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"),
         ("raw", "HI_OUTPUT", "-p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1")]


class Intents:
    """What write_iptables records before it writes (the ledger's part here)."""

    def __init__(self) -> None:
        self.objs: list[Any] = []

    def intent(self, objs: list[Any]) -> None:
        self.objs += objs


@pytest.fixture
def three() -> Iterator[tuple[str, str, str]]:
    names = ("hi-img-1", "hi-img-2", "hi-img-3")
    for n in names:
        ns.delete_netns(n)
        ns.create_netns(n)
    iptimage.forget()
    try:
        yield names
    finally:
        iptimage.forget()
        for n in names:
            ns.delete_netns(n)


def write(netns: str) -> Intents:
    chains = [IptChain(netns, t, c, j) for t, c, j in CHAINS]  # type: ignore[arg-type]
    rules = [IptRule(netns, t, c, s, "test") for t, c, s in RULES]  # type: ignore[arg-type]
    led = Intents()
    with ns.in_netns(netns):
        write_iptables(netns, ns.current_cookie(), chains, rules, led)  # type: ignore[arg-type]
    assert sorted(map(repr, led.objs)) == sorted(map(repr, [*chains, *rules]))  # recorded first, either way
    return led


def saved(netns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, "iptables-legacy-save"], capture_output=True, text=True,
                         check=True).stdout
    return [ln for ln in out.splitlines() if not ln.startswith("#")]


def test_second_netns_gets_the_first_ones_tables_in_one_write(three: tuple[str, str, str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    write(three[0])  # through libiptc; its three tables kept
    assert iptimage.images() == 3
    first = saved(three[0])
    assert "-A HI_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1" in first
    assert "-A OUTPUT -j HI_OUTPUT" in first and "-A PREROUTING -j HI_PRERT" in first

    def no_libiptc(*_a: Any, **_k: Any) -> None:
        raise AssertionError("libiptc used for a table an image stands for")

    monkeypatch.setattr(ipt.TableTx, "__init__", no_libiptc)
    write(three[1])
    assert saved(three[1]) == first


def test_a_table_that_is_not_fresh_goes_through_libiptc(three: tuple[str, str, str]) -> None:
    write(three[0])
    subprocess.run(["ip", "netns", "exec", three[2], "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-d",
                    "10.9.9.9/32", "-j", "RETURN"], check=True)
    write(three[2])  # nat is no longer the table the image was written onto: libiptc, adding to it
    got = saved(three[2])
    assert "-A OUTPUT -d 10.9.9.9/32 -j RETURN" in got
    assert "-A HI_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT" in got and "-A OUTPUT -j HI_OUTPUT" in got
    # mangle and raw were fresh there: they came from the images, the same as the first netns's
    assert [ln for ln in got if "HI_PRERT" in ln or "CT --zone" in ln] == \
           [ln for ln in saved(three[0]) if "HI_PRERT" in ln or "CT --zone" in ln]


def test_a_table_with_another_policy_goes_through_libiptc(three: tuple[str, str, str]) -> None:
    """Same entry count and size as the fresh table, other content: a policy (what the image's
    table info alone would not tell apart). The policy is kept."""
    write(three[0])
    subprocess.run(["ip", "netns", "exec", three[2], "iptables-legacy", "-t", "raw", "-P", "OUTPUT", "DROP"], check=True)
    write(three[2])
    got = saved(three[2])
    assert ":OUTPUT DROP [0:0]" in got
    assert "-A HI_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1" in got


def test_rules_naming_an_ipset_have_no_image() -> None:
    r = IptRule("x", "nat", "C", "-m set --match-set s dst -j ACCEPT", "test")
    assert iptimage.image_key("nat", [], [r]) is None
    assert iptimage.image_key("nat", [], [IptRule("x", "nat", "C", "-j ACCEPT", "test")]) is not None
