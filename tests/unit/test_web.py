"""`netlab ui`'s gate and routes without a lab (a backend that records calls), and the --html
page's escaping: what a hostile page, another local user or a hostile topology could try."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from netlab.errors import UsageError  # noqa: E402
from netlab.plan.build import build_plan  # noqa: E402
from netlab.topology.load import load_topology  # noqa: E402
from netlab.verify.html import script_json, trace_page  # noqa: E402
from netlab.web.app import build_app  # noqa: E402
from netlab.web.backend import BadRequest, LastCapture, destinations, pick, sources  # noqa: E402
from netlab.web.guard import allowed_hosts  # noqa: E402
from netlab.web.serve import check_address  # noqa: E402

TOKEN = "t0k3n-abc"
PLAN = build_plan(load_topology("sidecar-to-ambient"), lab="u2", tunnel="userspace")


class FakeBackend:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def labs(self) -> list[dict[str, Any]]:
        return [{"name": "u2", "health": "up"}]

    def view(self, name: str) -> dict[str, Any]:
        if name != "u2":
            raise BadRequest("no such lab is up", 404)
        return {"sources": sources(PLAN), "destinations": destinations(PLAN)}

    def trace(self, name: str, src: object, dst: object) -> dict[str, Any]:
        self.view(name)
        self.calls.append((name, pick(src, sources(PLAN), "source pod"), pick(dst, destinations(PLAN), "destination")))
        return {"ok": True}

    def capture(self, name: str) -> LastCapture:
        return LastCapture("abc", b"\x0a\x0d\x0d\x0a", 0)


@pytest.fixture
def client() -> tuple[TestClient, FakeBackend]:
    be = FakeBackend()
    app = build_app(be, token=TOKEN, hosts=allowed_hosts("127.0.0.1", 8080))
    return TestClient(app, base_url="http://127.0.0.1:8080"), be


def test_token_url_sets_a_strict_cookie_then_everything_works(client: tuple[TestClient, FakeBackend]) -> None:
    c, _ = client
    assert c.get("/").status_code == 401
    r = c.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
    c.cookies.set("netlab_ui", TOKEN)
    page = c.get("/")
    assert page.status_code == 200 and f'content="{TOKEN}"' in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert c.get("/api/labs").json() == {"labs": [{"name": "u2", "health": "up"}]}


@pytest.mark.parametrize("host", ["evil.example:8080", "127.0.0.1:9999", "127.0.0.1", "", "localhost.evil:8080"])
def test_foreign_host_is_refused(client: tuple[TestClient, FakeBackend], host: str) -> None:
    c, _ = client
    assert c.get("/api/labs", headers={"Host": host, "X-Netlab-Token": TOKEN}).status_code == 421


def test_post_needs_the_header_token_and_our_origin(client: tuple[TestClient, FakeBackend]) -> None:
    c, be = client
    body = {"from": "foo/sleep", "to": "httpbin.bar-1:8000"}
    c.cookies.set("netlab_ui", TOKEN)
    assert c.post("/api/labs/u2/trace", json=body).status_code == 403  # a cross-site form rides the cookie only
    h = {"X-Netlab-Token": TOKEN}
    assert c.post("/api/labs/u2/trace", json=body, headers={**h, "Origin": "http://evil.example"}).status_code == 403
    assert c.post("/api/labs/u2/trace", json=body, headers={**h, "Origin": "http://127.0.0.1:8080"}).status_code == 200
    assert be.calls == [("u2", "foo/sleep", "httpbin.bar-1:8000")]


@pytest.mark.parametrize("body", [
    {"from": "istio-system/ztunnel-node-a", "to": "httpbin.bar-1:8000"},  # not an application pod
    {"from": "foo/sleep", "to": "127.0.0.1:22"},  # not one of the lab's destinations
    {"from": "foo/sleep", "to": "httpbin.bar-1:8000; rm -rf /"},
    {"from": {"x": 1}, "to": "httpbin.bar-1:8000"},
    {"from": "foo/sleep", "to": "httpbin.bar-1:8000", "url": "/etc/passwd"},
    ["foo/sleep"],
])
def test_only_offered_parameters(client: tuple[TestClient, FakeBackend], body: Any) -> None:
    c, be = client
    r = c.post("/api/labs/u2/trace", content=json.dumps(body), headers={"X-Netlab-Token": TOKEN,
                                                                         "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert be.calls == []


def test_body_type_and_size(client: tuple[TestClient, FakeBackend]) -> None:
    c, _ = client
    h = {"X-Netlab-Token": TOKEN}
    assert c.post("/api/labs/u2/trace", content="from=foo", headers={**h, "Content-Type": "text/plain"}).status_code == 415
    big = json.dumps({"from": "x" * 10000, "to": "y"})
    assert c.post("/api/labs/u2/trace", content=big, headers={**h, "Content-Type": "application/json"}).status_code in (400, 413)


def test_wrong_tokens_and_unknown_lab(client: tuple[TestClient, FakeBackend]) -> None:
    c, _ = client
    for bad in ("", TOKEN[:-1], TOKEN + "x", "t0k3n-abd"):
        assert c.get("/api/labs", headers={"X-Netlab-Token": bad}).status_code == 401
    assert c.get("/api/labs/nope", headers={"X-Netlab-Token": TOKEN}).status_code == 404
    r = c.get("/api/labs/u2/capture.pcapng", headers={"X-Netlab-Token": TOKEN})
    assert r.content[:4] == b"\x0a\x0d\x0d\x0a" and "attachment" in r.headers["content-disposition"]
    assert r.headers["x-content-type-options"] == "nosniff"


def test_addresses() -> None:
    assert check_address("127.0.0.1", 8080, False) == "127.0.0.1"
    assert check_address("localhost", 8080, False) == "127.0.0.1"
    assert check_address("::1", 8080, False) == "::1"
    assert check_address("0.0.0.0", 8080, True) == "0.0.0.0"
    for host, port in (("0.0.0.0", 8080), ("192.168.1.5", 8080), ("example.com", 8080), ("127.0.0.1", 0),
                       ("127.0.0.1", 70000)):
        with pytest.raises(UsageError):
            check_address(host, port, False)
    assert allowed_hosts("::1", 8080) >= {"[::1]:8080", "127.0.0.1:8080", "localhost:8080"}
    assert allowed_hosts("10.1.2.3", 9000) == {"10.1.2.3:9000"}


def test_html_page_cannot_be_broken_out_of() -> None:
    evil = "</script><script>alert(1)</script><img src=x onerror=alert(2)>"
    trace = {"from": evil, "to": "x:1", "hops": [{"n": 1, "kind": "packet", "netns": "u2-foo-sleep", "iface": "eth0",
                                                  "what": evil, "at": evil}], "notes": [evil], "contract": None}
    page = trace_page(PLAN, trace)
    assert page.count("<script") == 2  # the JSON block and the page's own script, nothing injected
    assert "<img" not in page and "\\u003c/script" in script_json(evil)
    assert "connect-src" not in page and "default-src 'none'" in page  # the page may fetch nothing
