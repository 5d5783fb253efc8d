"""The kubelet of one node, as far as probes go: ``httpGet`` readiness and liveness probes.

A supervised process in the node's netns (``kubelet-<node>``), as the kubelet is a host process:
its probes leave from the node's own stack, so they meet the node-side rules each release has
for them -- 1.18's ``ztunnel-OUTPUT`` mark 0x220 on ``-s HOST_IP`` (reference §1.5, §8 D: the
probe skips ztunnel), the in-pod datapath's ``ISTIO_POSTRT`` SNAT to 169.254.7.127 for enrolled
pods and the pod's ``ISTIO_PRERT -s 169.254.7.127 -j ACCEPT`` (inpod reference §2.1, §5 P).

Each probe runs every ``periodSeconds``: a GET of ``path`` on the pod's IP and ``port`` with
``User-Agent: kube-probe/<k8s minor>``, a pass when the status is 200-399 within
``timeoutSeconds``; ``failureThreshold`` failures in a row make it fail, ``successThreshold``
passes make it pass (readiness starts failing, liveness passing, as the kubelet's do). The
results go to ``probes/<node>.json`` in the lab's state directory, which ``netlab status`` reads.
A failing liveness probe is reported, not acted on: the lab restarts no pod (docs/deviations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from netlab.mesh.process import run_proxy
from netlab.state import StateDir

log = logging.getLogger("netlab.kubelet")

USER_AGENT = "kube-probe/1.27"  # the kubelet names its minor version; 1.27 is what 1.18 runs on


@dataclass
class ProbeState:
    kind: str  # readiness | liveness
    pod: str
    ip: str
    port: int
    path: str
    periodSeconds: int = 1
    timeoutSeconds: int = 1
    failureThreshold: int = 3
    successThreshold: int = 1
    passing: bool = False
    successes: int = 0  # in a row
    failures: int = 0  # in a row
    total_failures: int = 0
    last: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.passing = self.kind == "liveness"  # readiness: not ready until it passes

    def record(self, ok: bool, result: str) -> None:
        self.last = {"time": time.time(), "ok": ok, "result": result}
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.successThreshold:
                self.passing = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            self.total_failures += 1
            if self.failures >= self.failureThreshold:
                self.passing = False


async def http_probe(ip: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """One ``httpGet`` probe: (passed, what happened)."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(ip, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: {USER_AGENT}\r\n"
                         "Accept: */*\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return False, f"timeout after {timeout:g}s"
    except OSError as e:
        return False, e.strerror or type(e).__name__
    finally:
        if writer is not None:
            writer.close()
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return False, "no HTTP response" if not line else f"not HTTP: {line[:40]!r}"
    code = int(parts[1])
    return 200 <= code < 400, f"HTTP {code}"


@dataclass
class Kubelet:
    lab: str
    node: str
    probes: list[ProbeState]
    files: StateDir
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def ready_fields(self) -> dict[str, Any]:
        return {"app": "kubelet", "name": f"kubelet-{self.node}", "node": self.node,
                "probes": [f"{p.kind} {p.pod} {p.ip}:{p.port}{p.path}" for p in self.probes]}

    async def start(self) -> Kubelet:
        d = self.files.probes
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o755)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise SystemExit(f"{d}: not a directory of ours; not writing there")
        self.write()
        self._tasks = [asyncio.get_running_loop().create_task(self._run(p)) for p in self.probes]
        return self

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, p: ProbeState) -> None:
        while True:
            ok, result = await http_probe(p.ip, p.port, p.path, p.timeoutSeconds)
            was = p.passing
            p.record(ok, result)
            if p.passing != was:
                log.info("%s probe of %s: %s (%s)", p.kind, p.pod, "passing" if p.passing else "failing", result)
            self.write()
            await asyncio.sleep(p.periodSeconds)

    def write(self) -> None:
        """The probes' state, replaced whole (a reader never sees half of it)."""
        dest = self.files.probe_status(self.node)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_text(json.dumps({"node": self.node, "probes": [asdict(p) for p in self.probes]}))
        tmp.rename(dest)


def read_status(files: StateDir, node: str) -> list[dict[str, Any]]:
    """The probes of ``node``'s kubelet as it last wrote them ([] before it did)."""
    try:
        probes: list[dict[str, Any]] = json.loads(files.probe_status(node).read_text())["probes"]
        return probes
    except (OSError, ValueError, KeyError, TypeError):
        return []


def main(argv: list[str] | None = None) -> int:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--lab", required=True)
        p.add_argument("--node", required=True)
        p.add_argument("--probes", required=True, help="JSON list: {kind, pod, ip, port, path, periodSeconds, ...}")

    async def start(args: argparse.Namespace, p: argparse.ArgumentParser) -> Kubelet:
        try:
            probes = [ProbeState(**d) for d in json.loads(args.probes)]
        except (ValueError, TypeError) as e:
            p.error(f"--probes: {e}")
        return await Kubelet(args.lab, args.node, probes, StateDir.of(args.lab)).start()

    return run_proxy(argv, prog="netlab.mesh.kubelet", description=__doc__ or "", add_arguments=arguments,
                     start=start, log_name=lambda a: f"kubelet[{a.node}]")


if __name__ == "__main__":
    raise SystemExit(main())
