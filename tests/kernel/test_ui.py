"""`netlab ui` in headless Chromium on a real S2 lab: choose the lab, run a trace from foo/sleep to
httpbin.bar-1:8000, see all its hops and the contract verdict, download the trace's capture; and
the server refuses foreign Host headers, requests without the token, and parameters not offered."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netlab.lab import Lab
from tests.browser import chromium, needs_browser, wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

NETLAB = [sys.executable, "-m", "netlab.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ui(netlab_run_dir: object) -> Iterator[dict[str, Any]]:
    Lab.up("sidecar-to-ambient", name="hu-s2", tunnel="userspace")
    port = free_port()
    proc = subprocess.Popen([*NETLAB, "ui", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        m = re.search(r"open (http://127\.0\.0\.1:(\d+)/\?token=([\w-]+))", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        for _ in range(100):  # uvicorn listens a moment after the line
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                import time

                time.sleep(0.05)
        yield {"url": m.group(1), "port": port, "token": m.group(3)}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        Lab.down_lab("hu-s2")


def request(ui: dict[str, Any], method: str, path: str, *, host: str | None = None, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, bytes, dict[str, str]]:
    c = http.client.HTTPConnection("127.0.0.1", ui["port"], timeout=60)
    c.putrequest(method, path, skip_host=True)
    c.putheader("Host", host or f"127.0.0.1:{ui['port']}")
    for k, v in (headers or {}).items():
        c.putheader(k, v)
    c.putheader("Content-Length", str(len(body or b"")))
    c.endheaders(body)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data, {k.lower(): v for k, v in r.getheaders()}


@needs_browser
def test_ui_traces_s2_in_a_browser(ui: dict[str, Any], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with chromium() as driver:
        driver.get(ui["url"])
        assert "token=" not in driver.current_url  # kept in a cookie, out of the address bar
        wait_for(driver, 'button.lab[data-lab="hu-s2"]').click()
        wait_for(driver, "#base-fig svg")
        assert driver.find_element(By.CSS_SELECTOR, "#lab-health").text == "up"
        procs = driver.find_elements(By.CSS_SELECTOR, "#procs tbody tr")
        assert procs and all(r.find_elements(By.CSS_SELECTOR, "td")[2].text == "running" for r in procs)
        Select(driver.find_element(By.ID, "src")).select_by_value("foo/sleep")
        Select(driver.find_element(By.ID, "dst")).select_by_value("httpbin.bar-1:8000")
        driver.find_element(By.ID, "run").click()
        wait_for(driver, "#result li.hop", timeout=60)
        items = driver.find_elements(By.CSS_SELECTOR, "#result li.hop")
        title = driver.find_element(By.CSS_SELECTOR, "#result svg text").text
        n = int(re.search(r"· (\d+) hops ·", title).group(1))  # type: ignore[union-attr]
        assert len(items) == n == len(driver.find_elements(By.CSS_SELECTOR, "#result svg g.badge")) > 9
        seeds = [i.find_element(By.CSS_SELECTOR, ".seed").text for i in items]
        assert [s for s in seeds if s != "·"] == [f"({k})" for k in range(1, 10)]  # the seed's (1)-(9), in order
        assert driver.find_element(By.CSS_SELECTOR, "#result .verdict").text.startswith("contract S2: MATCH")
        items[seeds.index("(7)")].click()
        details = driver.find_element(By.CSS_SELECTOR, "#result .details").text
        assert "pistioin" in details and "§2.2 mangle PREROUTING #1" in details
        link = driver.find_element(By.ID, "capture")
        assert link.is_displayed() and link.get_attribute("href").endswith("/api/labs/hu-s2/capture.pcapng")
        driver.save_screenshot(str(tmp_path / "ui-s2.png"))
    status, data, headers = request(ui, "GET", "/api/labs/hu-s2/capture.pcapng", headers={"X-Netlab-Token": ui["token"]})
    assert status == 200 and data[:4] == b"\x0a\x0d\x0d\x0a"
    pcap = tmp_path / "t.pcapng"
    pcap.write_bytes(data)
    t = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "tcp.dstport"], capture_output=True, text=True)
    ports = set(" ".join(t.stdout.split(",")).split())
    assert {"15001", "15008", "80"} <= ports, ports  # the trace's legs: to the sidecar, HBONE, to the app


def test_ui_refuses_what_it_should(ui: dict[str, Any]) -> None:
    tok = {"X-Netlab-Token": ui["token"]}
    assert request(ui, "GET", "/api/labs", host=f"evil.example:{ui['port']}", headers=tok)[0] == 421  # DNS rebinding
    assert request(ui, "GET", "/api/labs")[0] == 401  # no token
    assert request(ui, "GET", "/api/labs", headers={"X-Netlab-Token": ui["token"][:-1] + "x"})[0] == 401
    status, body, headers = request(ui, "GET", "/api/labs", headers=tok)
    assert status == 200 and [x["name"] for x in json.loads(body)["labs"]] == ["hu-s2"]
    assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store"
    cookie = {"Cookie": f"netlab_ui={ui['token']}", "Content-Type": "application/json"}
    body = json.dumps({"from": "foo/sleep", "to": "httpbin.bar-1:8000"}).encode()
    assert request(ui, "POST", "/api/labs/hu-s2/trace", headers=cookie, body=body)[0] == 403  # CSRF: cookie alone
    post = {**tok, "Content-Type": "application/json"}
    assert request(ui, "POST", "/api/labs/hu-s2/trace", headers={**post, "Origin": "http://evil.example"}, body=body)[0] == 403
    for bad in ({"from": "istio-system/ztunnel-node-a", "to": "httpbin.bar-1:8000"},
                {"from": "foo/sleep", "to": "10.0.2.3:22"}, {"from": "foo/sleep", "to": "httpbin.bar-1:8000", "x": 1},
                {"from": ["foo/sleep"], "to": "httpbin.bar-1:8000"}):
        assert request(ui, "POST", "/api/labs/hu-s2/trace", headers=post, body=json.dumps(bad).encode())[0] == 400, bad
    assert request(ui, "POST", "/api/labs/..%2Fetc/trace", headers=post, body=body)[0] == 404
    assert request(ui, "GET", "/api/labs/nolab", headers=tok)[0] == 404
    page = request(ui, "GET", "/", headers=tok)
    assert page[0] == 200 and "script-src 'nonce-" in page[2]["content-security-policy"]


def test_ui_address_rules() -> None:
    r = subprocess.run([*NETLAB, "ui", "--host", "0.0.0.0", "--port", str(free_port())], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "--allow-remote" in r.stderr
    r = subprocess.run([*NETLAB, "ui", "--host", "evil.example"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "IP address" in r.stderr
