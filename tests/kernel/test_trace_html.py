"""`netlab trace ... --html FILE` opened in headless Chromium: the page shows as many hops as
`--json` reports (same run), clicking S1's hop (4) shows pistioout and its rule, the arrow of the
hop lights up, the step control walks the hops, nothing is fetched; and two traces side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netlab.lab import Lab
from netlab.verify.diagram import write_nofollow
from netlab.verify.html import compare_page
from tests.browser import chromium, needs_browser

pytestmark = [pytest.mark.kernel, needs_browser, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

NETLAB = [sys.executable, "-m", "netlab.cli"]
CASES = [("S1", "hh-s1", "httpbin.bar:8000"), ("S2", "hh-s2", "httpbin.bar-1:8000"), ("S3", "hh-s2", "helloworld.bar-2:5000")]


@pytest.fixture(scope="module")
def labs(netlab_run_dir: object) -> Iterator[dict[str, Lab]]:
    made = {}
    try:
        made["hh-s1"] = Lab.up("ambient-to-sidecar", name="hh-s1", tunnel="userspace")
        made["hh-s2"] = Lab.up("sidecar-to-ambient", name="hh-s2", tunnel="userspace")
        yield made
    finally:
        for name in made:
            Lab.down_lab(name)


def trace_html(lab: str, dst: str, out: Path) -> dict[str, Any]:
    r = subprocess.run([*NETLAB, "trace", "--lab", lab, "--from", "foo/sleep", "--to", dst, "--json", "--html", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def hop_items(driver: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "li.hop")


@pytest.mark.parametrize(("path", "lab", "dst"), CASES)
def test_html_page_shows_every_hop(labs: dict[str, Lab], tmp_path: Path, path: str, lab: str, dst: str) -> None:
    from selenium.webdriver.common.by import By

    page = tmp_path / f"{path}.html"
    d = trace_html(lab, dst, page)
    assert d["contract"] == path and d["match"] is True
    with chromium() as driver:
        driver.get(page.as_uri())
        items = hop_items(driver)
        assert len(items) == len(d["hops"]) > 0
        assert [i.find_element(By.CSS_SELECTOR, ".obs").text for i in items] == [f"#{h['n']}" for h in d["hops"]]
        svg = driver.find_element(By.CSS_SELECTOR, "svg.netlab-figure")
        assert len(svg.find_elements(By.CSS_SELECTOR, "g.badge")) == len(d["hops"])
        assert "MATCH" in driver.find_element(By.CSS_SELECTOR, ".verdict").text
        # self-contained: nothing but the file itself was loaded
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
        driver.save_screenshot(str(tmp_path / f"{path}.png"))


def test_s1_hop_4_details_highlight_and_step(labs: dict[str, Lab], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    page = tmp_path / "s1.html"
    d = trace_html("hh-s1", "httpbin.bar:8000", page)
    four = next(h for h in d["hops"] if h["seed_n"] == "4")
    with chromium() as driver:
        driver.get(page.as_uri())
        item = next(i for i in hop_items(driver) if i.find_element(By.CSS_SELECTOR, ".seed").text == "(4)")
        item.click()
        details = driver.find_element(By.CSS_SELECTOR, ".details").text
        assert "pistioout" in details and "§2.2 mangle PREROUTING #2" in details
        assert "Geneve VNI 1001" in details and "0x400" in details and "table 100" in details
        lit = driver.find_elements(By.CSS_SELECTOR, "svg .arrow.hl")
        assert lit and {a.get_attribute("data-hop") for a in lit} == {str(four["n"])}
        assert driver.find_element(By.CSS_SELECTOR, f'svg g.badge[data-hop="{four["n"]}"]').get_attribute("class") \
            == "badge hl"
        driver.save_screenshot(str(tmp_path / "s1-hop4.png"))
        # the step control: first, then next twice -> hop 3
        driver.find_element(By.CSS_SELECTOR, ".stepper .first").click()
        for _ in range(2):
            driver.find_element(By.CSS_SELECTOR, ".stepper .next").click()
        assert driver.find_element(By.CSS_SELECTOR, ".stepper .pos").text == f"3 / {len(d['hops'])}"
        assert driver.find_element(By.CSS_SELECTOR, "li.hop.sel .obs").text == "#3"
        # clicking a number on the figure selects that hop too
        driver.find_element(By.CSS_SELECTOR, f'svg g.badge[data-hop="{four["n"]}"]').click()
        assert driver.find_element(By.CSS_SELECTOR, "li.hop.sel .seed").text == "(4)"


def test_two_traces_side_by_side(labs: dict[str, Lab], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    d1 = trace_html("hh-s1", "httpbin.bar:8000", tmp_path / "a.html")
    d2 = trace_html("hh-s2", "httpbin.bar-1:8000", tmp_path / "b.html")
    page = tmp_path / "compare.html"
    write_nofollow(str(page), compare_page((labs["hh-s1"].plan, d1, "S1"), (labs["hh-s2"].plan, d2, "S2")))
    with chromium() as driver:
        driver.get(page.as_uri())
        panes = driver.find_elements(By.CSS_SELECTOR, "section.pane")
        assert len(panes) == 2
        a, b = (p.rect for p in panes)
        assert abs(a["y"] - b["y"]) < 2 and b["x"] >= a["x"] + a["width"]  # side by side
        for pane, d in zip(panes, (d1, d2), strict=True):
            assert len(pane.find_elements(By.CSS_SELECTOR, "li.hop")) == len(d["hops"])
        # each pane has its own selection
        panes[1].find_elements(By.CSS_SELECTOR, "li.hop")[0].click()
        assert not panes[0].find_elements(By.CSS_SELECTOR, "li.hop.sel")
        assert panes[1].find_element(By.CSS_SELECTOR, ".details").text.startswith("(1) hop 1")
        driver.save_screenshot(str(tmp_path / "compare.png"))
