"""Faults on the seed paths: SIGKILL a proxy mid-stream.

For each victim, streams are kept in flight (paced writes) through it, the victim's PID (from the
supervisor's ``procs.json``) gets SIGKILL, and

* every in-flight stream ends either complete with the right sha256, or with an error the client
  sees (reset / EPIPE) - never a clean end with missing bytes (``bad_digest``), and never a
  clean EOF without the digest (``eof_short``): a relay that turns a reset into a FIN fails here;
* the supervisor restarts the victim, and a NEW connection succeeds within 1 s of the kill
  (new probe connections are started every 25 ms from the kill on; recovery = first success);
* surviving proxies are back at their idle fd count (the reset paths leak nothing).

The userspace Geneve encapsulator only carries a connection's first packet (reference §8 A
step 8: the SYN; later packets go by connmark over the ztunnel veth), so killing ``geneve-node-a``
must not break streams already established, only delay new ones until it is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netlab.lab import Lab
from tests import loadgen as lg

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

LAB_NAMES = {"S1": "hl-fault-s1", "S23": "hl-fault-s23"}
INFLIGHT = 12  # streams in flight at the kill
STREAM_SIZE = 1 << 20
CHUNK = 64 * 1024
PACE_S = 0.12  # 16 chunks x 0.12 s: each stream lasts ~2 s
KILL_AFTER_S = 0.6
PROBE_EVERY_S = 0.025


run_dir, netlab_run_dir, labs = lg.lab_fixtures("hl-fault", LAB_NAMES)


@dataclass
class FaultRun:
    victim: str
    old_pid: int
    inflight: list[lg.StreamResult] = field(default_factory=list)
    probes: list[lg.StreamResult] = field(default_factory=list)
    t_kill: float = 0.0
    recovered_s: float | None = None  # kill -> first NEW connection with the right digest
    restarted_s: float | None = None  # kill -> the supervisor shows a new running PID
    new_pid: int | None = None
    salt: int = 0

    def outcomes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.inflight:
            out[r.outcome] = out.get(r.outcome, 0) + 1
        return out


def _pid_of(state_dir: Path, name: str) -> tuple[int | None, str]:
    try:
        rec = json.loads((state_dir / "procs.json").read_text())[name]
    except (FileNotFoundError, ValueError, KeyError):
        return None, ""
    return rec.get("pid"), rec.get("state", "")


async def _fault(state_dir: Path, victim: str, dst: tuple[str, int]) -> FaultRun:
    pid, state = _pid_of(state_dir, victim)
    assert pid and state == "running", f"{victim}: not running ({state})"
    salt = int.from_bytes(os.urandom(3), "big")
    run = FaultRun(victim=victim, old_pid=pid, salt=salt)
    connected = asyncio.Event()
    n_conn = 0

    def on_start(_r: lg.StreamResult) -> None:
        nonlocal n_conn
        n_conn += 1
        if n_conn == INFLIGHT:
            connected.set()

    inflight = [asyncio.ensure_future(lg.one_stream(dst, i, STREAM_SIZE, salt=salt, chunk=CHUNK, pace_s=PACE_S,
                                                    timeout=30, started=on_start)) for i in range(INFLIGHT)]
    await asyncio.wait_for(connected.wait(), 10)
    await asyncio.sleep(KILL_AFTER_S)
    run.t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    probes: list[asyncio.Future[lg.StreamResult]] = []
    i = 10_000
    while time.monotonic() - run.t_kill < 3.0:
        now = time.monotonic()
        if run.restarted_s is None:
            new, st = _pid_of(state_dir, victim)
            if new and new != pid and st == "running":
                run.restarted_s, run.new_pid = now - run.t_kill, new
        done_ok = [p.result() for p in probes if p.done() and p.result().ok]
        if done_ok:
            first = min(done_ok, key=lambda r: r.t_start + r.total_s)
            run.recovered_s = first.t_start + first.total_s - run.t_kill
            break
        probes.append(asyncio.ensure_future(lg.one_stream(dst, i, 4096, salt=salt, connect_timeout=1.0, timeout=1.5)))
        i += 1
        await asyncio.sleep(PROBE_EVERY_S)
    run.inflight = list(await asyncio.gather(*inflight))
    run.probes = list(await asyncio.gather(*probes))
    if run.recovered_s is None:
        ok = [r for r in run.probes if r.ok]
        if ok:
            first = min(ok, key=lambda r: r.t_start + r.total_s)
            run.recovered_s = first.t_start + first.total_s - run.t_kill
    return run


def do_fault(lab: Lab, path: str, victim: str, client_adjacent: bool = False, sink_check: bool = False) -> FaultRun:
    """``client_adjacent``: only plain TCP hops lie between the victim and the client, so the
    kernel's FIN for the dead process's sockets may reach the client (then a RST) - a relay cannot
    tell it from a half-close.
    Anywhere else a FIN before the error means a relay turned the reset into a clean end.
    ``sink_check``: live proxies stand between the victim and the sink too, so the sink must see
    every cut stream as a reset (logged ``error``), never as a clean short stream."""
    netns, dst, sink = lg.path_target(lab, path)
    warm = lg.run_load(netns, dst, 2, 4096)
    assert not warm.errors, [str(e) for e in warm.errors]
    idle = {n: v for n, v in lg.settled_snapshot(lab.state_dir).items() if n != victim}
    lg.raise_nofile()
    sink_before = len(lg.sink_log_records(lab.state_dir, sink))
    run = lg.run_in_netns(netns, lambda: lg.run_async(lambda: _fault(lab.state_dir, victim, dst)))
    rec = f"{run.recovered_s:.3f} s" if run.recovered_s is not None else "never (3 s)"
    rst = f"{run.restarted_s:.3f} s" if run.restarted_s is not None else "not seen"
    print(f"\n[fault {path} kill {victim}] in-flight {run.outcomes()}; supervisor restart {rst}; "
          f"first NEW connection ok {rec} after the kill ({len(run.probes)} probes)")
    bad = [r for r in run.inflight if r.outcome not in ("ok", "reset")]
    assert not bad, "in-flight streams ended wrongly (a reset became a clean end?): " + "; ".join(
        f"#{r.idx} {r.outcome} {r.detail} sent={r.sent}" for r in bad)
    fin = [r for r in run.inflight if r.fin_first]
    if fin:
        print(f"[fault {path} kill {victim}] {len(fin)} streams got a FIN before the reset")
    if not client_adjacent:
        assert not fin, "a relay passed the kill on as a clean FIN: " + "; ".join(f"#{r.idx} {r.detail}" for r in fin)
    if sink_check:
        time.sleep(0.3)
        recs = lg.sink_log_records(lab.state_dir, sink)[sink_before:]
        cut = [x for x in recs if x.get("bytes") not in (STREAM_SIZE, 4096)]
        clean_short = [x for x in cut if "error" not in x]
        print(f"[fault {path} kill {victim}] sink: {len(cut)} cut streams, {len(clean_short)} ended cleanly")
        assert not clean_short, f"the sink saw cut streams end with a clean FIN: {clean_short[:3]}"
        n_reset = sum(r.outcome == "reset" for r in run.inflight)
        assert len(cut) >= n_reset, f"sink logged {len(cut)} cut streams for {n_reset} client resets"
    for r in run.inflight:  # an ok stream carried every byte; a reset one is flagged, never short+clean
        assert r.ok == (r.sent == STREAM_SIZE and r.reply == lg.stream_digest(r.idx, STREAM_SIZE, run.salt))
    assert run.restarted_s is not None, f"supervisor did not restart {victim} within 3 s"
    assert run.recovered_s is not None, f"no new connection succeeded after killing {victim}: " + "; ".join(
        f"{r.outcome} {r.detail}" for r in run.probes[-3:])
    limit = lg.time_limit(1.0, "NETLAB_FAULT_RECOVERY_S")  # brief: 1 s on an idle machine
    assert run.recovered_s <= limit, f"new connection only {run.recovered_s:.3f} s after the kill (limit {limit:.2f} s)"
    okk, over, waited = lg.wait_fds_idle(lab.state_dir, idle, timeout=5.0)
    assert okk, f"surviving proxies' fds not back to idle after {waited:.1f} s: {over} (idle, now)"
    return run


# ---- victims ----------------------------------------------------------------------------------
def test_kill_ztunnel_source_node_s1(labs: dict[str, Lab]) -> None:
    """S1's only ztunnel is the source node's (the destination is a sidecar pod): ztunnel-node-a."""
    run = do_fault(labs["S1"], "S1", "ztunnel-node-a", client_adjacent=True)
    assert run.outcomes().get("reset"), "no in-flight stream saw the kill"


def test_kill_destination_sidecar_s1(labs: dict[str, Lab]) -> None:
    """ztunnel-node-a reaches the sidecar over plain TCP: the kernel's FIN for the dead sidecar's
    socket is a legitimate half-close to ztunnel, which passes it on (then the RST that the next
    write draws). The client still sees an error, never a digest of a short stream."""
    run = do_fault(labs["S1"], "S1", "sink.bar-sidecar", client_adjacent=True)
    assert run.outcomes().get("reset"), "no in-flight stream saw the kill"


def test_kill_geneve_encapsulator_s1(labs: dict[str, Lab]) -> None:
    """Only SYNs cross geneve-node-a: established streams survive, new ones wait for the restart."""
    run = do_fault(labs["S1"], "S1", "geneve-node-a")
    assert run.outcomes() == {"ok": INFLIGHT}, "streams established before the kill must not notice it"


def test_kill_destination_ztunnel_s2(labs: dict[str, Lab]) -> None:
    run = do_fault(labs["S23"], "S2", "ztunnel-node-b")
    assert run.outcomes().get("reset"), "no in-flight stream saw the kill"


def test_kill_source_sidecar_s2(labs: dict[str, Lab]) -> None:
    run = do_fault(labs["S23"], "S2", "sleep.foo-sidecar", client_adjacent=True)
    assert run.outcomes().get("reset"), "no in-flight stream saw the kill"


def test_kill_waypoint_s3(labs: dict[str, Lab]) -> None:
    run = do_fault(labs["S23"], "S3", "waypoint.bar-2", sink_check=True)
    assert run.outcomes().get("reset"), "no in-flight stream saw the kill"


def test_kill_destination_ztunnel_s3(labs: dict[str, Lab]) -> None:
    run = do_fault(labs["S23"], "S3", "ztunnel-node-d")
    assert run.outcomes().get("reset"), "no in-flight stream saw the kill"
