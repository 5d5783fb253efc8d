"""Own programs in pods (issue 22), without root: the topology fields and their errors, the plan's
process for a ``command``, and the readiness probe against real loopback sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from netlab.plan.build import POD_GID, POD_UID, build_plan
from netlab.runtime.probe import ALIVE_GRACE, ReadyCheck
from netlab.runtime.spawn import ProcSpec, child_env
from netlab.topology.load import load_topology

NETLAB = str(Path(sys.executable).with_name("netlab"))
BASE = """\
name: own
nodes: [{name: node-a}]
namespaces: {bar: {}}
pods:
"""


def _plan_cli(tmp_path: Path, pods: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "own.yaml"
    f.write_text(BASE + pods)
    return subprocess.run([NETLAB, "plan", str(f)], capture_output=True, text=True, timeout=60)


def test_app_that_is_no_builtin_and_no_command_is_one_line_exit_2(tmp_path: Path) -> None:
    r = _plan_cli(tmp_path, "  - {name: web, namespace: bar, node: node-a, app: web, ports: [80]}\n")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "own.yaml: pods[0].command:" in lines[0] and "app 'web' is not a built-in program" in lines[0], lines[0]


@pytest.mark.parametrize("pod, field, words", [
    ("{name: w, namespace: bar, node: node-a, app: httpbin, readiness: {port: 80}}", "pods[0].readiness", "needs a command"),
    ("{name: w, namespace: bar, node: node-a, command: []}", "pods[0].command", "non-empty"),
    ("{name: w, namespace: bar, node: node-a, command: [x], readiness: {port: 0}}", "pods[0].readiness.port", "outside 1..65535"),
    ("{name: w, namespace: bar, node: node-a, command: [x], readiness: {port: 80, path: nope}}", "pods[0].readiness.path", "start with '/'"),
    ("{name: w, namespace: bar, node: node-a, command: [x], readyness: {port: 80}}", "pods[0].readyness", "unknown key"),
])
def test_bad_own_program_fields_name_the_field(tmp_path: Path, pod: str, field: str, words: str) -> None:
    r = _plan_cli(tmp_path, f"  - {pod}\n")
    assert r.returncode == 2 and f": {field}: " in r.stderr and words in r.stderr, r.stderr


def test_builtins_and_sleep_still_need_no_command() -> None:
    topo = load_topology("ambient-to-sidecar")
    assert all(p.command is None for p in topo.pods)


def test_plan_runs_the_command_as_the_pods_user_with_its_hosts_and_probe() -> None:
    plan = build_plan(load_topology("own-programs"))
    web = next(p for p in plan.processes if p.name == "web.bar")
    pod = plan.pod("bar/web")
    assert web.argv == ("python3", "-m", "http.server", "8080") and web.run == "exec"
    assert (web.uid, web.gid) == (POD_UID, POD_GID) == (65534, 65534)
    assert web.netns == pod.netns and web.netns_etc and web.kind == "app"
    assert (web.ready_port, web.ready_path, web.ready_hosts) == (8080, "/", ("127.0.0.1", pod.ip))
    client = next(p for p in plan.processes if p.name == "client.foo")
    assert client.argv == ("sleep", "infinity") and client.ready_port == 0
    # unprivileged ports in the pods that run a command, as containerd gives every pod
    knobs = {(s.netns, s.key_name): s.value for s in plan.sysctls}
    assert knobs[(pod.netns, "net.ipv4.ip_unprivileged_port_start")] == "0"
    assert (plan.pod("foo/client").netns, "net.ipv4.ip_unprivileged_port_start") in knobs


def test_own_program_gets_a_small_fixed_environment_not_the_callers() -> None:
    plan = build_plan(load_topology("own-programs"))
    spec = ProcSpec.from_any(next(p for p in plan.processes if p.name == "web.bar"))
    assert spec.command() == ["python3", "-m", "http.server", "8080"]
    env = child_env(spec, "own", base={"SECRET": "x", "PATH": "/root/bin"})
    assert "SECRET" not in env and env["PATH"].startswith("/usr/local/sbin") and "/root" not in env["PATH"]
    assert (env["POD_NAME"], env["POD_NAMESPACE"], env["NETLAB_PROC"]) == ("web", "bar", "web.bar")


# ---- the readiness probe, against real sockets on loopback (netns "" = this namespace) ----

def _spec(port: int, path: str = "") -> ProcSpec:
    return ProcSpec(name="p", netns="", kind="app", argv=("x",), run="exec", ready_port=port, ready_path=path,
                    ready_hosts=("127.0.0.1",))


def _poll(check: ReadyCheck, seconds: float = 2.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check.poll(time.monotonic()):
            return True
        time.sleep(0.01)
    return False


def _http_server(status: int) -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.recv(4096)
            c.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_probe_tcp_waits_for_a_listener() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    check = ReadyCheck(_spec(port), time.monotonic())
    assert not _poll(check, 0.3) and "refused" in check.last_error.lower()
    s.listen()
    assert _poll(check)
    s.close()


@pytest.mark.parametrize("status, ready", [(200, True), (302, True), (500, False), (404, False)])
def test_probe_http_wants_200_to_399(status: int, ready: bool) -> None:
    srv, port = _http_server(status)
    try:
        check = ReadyCheck(_spec(port, "/healthz"), time.monotonic())
        assert _poll(check, 0.5) is ready
        if not ready:
            assert f"status {status}" in check.last_error
    finally:
        srv.close()


def test_no_probe_means_alive_for_a_moment() -> None:
    t0 = time.monotonic()
    check = ReadyCheck(_spec(0), t0)
    assert not check.poll(t0 + ALIVE_GRACE / 2) and check.poll(t0 + ALIVE_GRACE)
