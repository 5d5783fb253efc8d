"""Load through the three seed paths: N concurrent streams x M bytes, sha256 checked at both ends.

* S1 ambient sleep -> ztunnel-node-a (TPROXY 15001) -> plain TCP -> sink's sidecar (15006) -> sink
* S2 sidecar sleep -> HBONE -> ztunnel-node-b (15008) -> sink (bar-1, ambient)
* S3 sidecar sleep -> HBONE -> waypoint (node-c) -> HBONE -> ztunnel-node-d -> sink (bar-2)

Each stream is distinct; the client knows its digest, the sink replies with the digest of what it
received (after the client's half-close) and also logs it, so both ends are checked. Afterwards
every proxy (ztunnel, sidecar, waypoint, userspace geneve) must be back at its idle fd count.

Size: ``NETLAB_LOAD_SCALE`` = ``CONNSxSIZE`` (default ``100x256KiB``; ``full`` = ``1000x1MiB``).
``.venv/bin/pytest -s -m kernel tests/kernel/test_load.py`` prints the figures.
"""

from __future__ import annotations

import time

import pytest

from netlab.lab import Lab
from tests import loadgen as lg

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

LAB_NAMES = {"S1": "hl-load-s1", "S23": "hl-load-s23"}


run_dir, netlab_run_dir, labs = lg.lab_fixtures("hl-load", LAB_NAMES)


@pytest.mark.parametrize("path", ["S1", "S2", "S3"])
def test_concurrent_streams_sha256_and_fds_back_to_idle(labs: dict[str, Lab], path: str) -> None:
    conns, size = lg.load_scale()
    lab = labs[lg.SEED_PATHS[path][0]]
    netns, dst, sink = lg.path_target(lab, path)

    warm = lg.run_load(netns, dst, 4, 4096)  # lazily opened files (logs, TLS) before the idle count
    assert not warm.errors, [str(e) for e in warm.errors]
    idle = lg.settled_snapshot(lab.state_dir)
    assert idle, "no proxy process found"
    seen_before = len(lg.sink_log_records(lab.state_dir, sink))

    res = lg.run_load(netns, dst, conns, size, salt=None)
    print(f"\n[load {path}] {res.summary()}")
    assert not res.errors, f"{len(res.errors)} of {conns} streams failed: " + "; ".join(
        f"#{e.idx} {e.outcome} {e.detail}" for e in res.errors[:10])

    # the other end: the sink logged one clean record per stream, with the digest the client sent
    want = res.digests()
    recs = lg.sink_log_records(lab.state_dir, sink)[seen_before:]
    deadline = time.monotonic() + 3
    while len(recs) < conns and time.monotonic() < deadline:  # log lines land just after the reply
        time.sleep(0.05)
        recs = lg.sink_log_records(lab.state_dir, sink)[seen_before:]
    got = {r.get("sha256") for r in recs if "error" not in r and r.get("bytes") == size}
    assert want <= got, f"sink did not log {len(want - got)} of {conns} stream digests"

    ok, over, waited = lg.wait_fds_idle(lab.state_dir, idle, timeout=5.0)
    after = lg.proxy_snapshot(lab.state_dir)
    print(f"[load {path}] proxies' fds idle {sum(v['fds'] for v in idle.values())} -> "
          f"{sum(v['fds'] for v in after.values())} after {waited:.2f} s; RSS "
          f"{sum(v['rss_kib'] for v in idle.values()) // 1024} -> {sum(v['rss_kib'] for v in after.values()) // 1024} MiB")
    assert ok, f"proxy fds not back to idle after {waited:.1f} s: {over} (idle, now)"
    restarted = {n for n, v in idle.items() if after.get(n, {}).get("pid") != v["pid"]}
    assert not restarted, f"proxies died under load: {restarted}"


@pytest.mark.parametrize("path", ["S1", "S2", "S3"])
def test_connect_burst_fits_every_listeners_accept_queue(labs: dict[str, Lab], path: str) -> None:
    """1000 connects at once (soak's burst), small streams: no listener on the path (ztunnel's
    TPROXY 15001, the sidecar's 15001/15006, HBONE 15008, the sink) drops a SYN for a full accept
    queue. A drop costs its client a 1 s SYN retry, and three in a row a connect timeout."""
    lab = labs[lg.SEED_PATHS[path][0]]
    netns, dst, _ = lg.path_target(lab, path)
    names = [n.name for n in lab.plan.netns]
    before = lg.listen_drops(names)
    res = lg.run_load(netns, dst, 1000, 1024)
    after = lg.listen_drops(names)
    print(f"\n[burst {path}] {res.summary()}")
    assert not res.errors, f"{len(res.errors)} of 1000 streams failed: " + "; ".join(
        f"#{e.idx} {e.outcome} {e.detail}" for e in res.errors[:10])
    drops = {n: after[n] - before[n] for n in names if after[n] != before[n]}
    assert not drops, f"listen queues overflowed (TcpExtListenDrops by netns): {drops}"
