"""The node agent's snapshot goes ahead of its acks (issue 24; docs/deviations.md).

istio-cni waits for each ack before the next message; the lab's agent sends up to a window of
requests ahead and reads the acks in order (``ZtunnelConn.requests``). Seen from the peer: the
same messages, each ``add`` with its own fd, in order; no more than the window unanswered; each
fd closed on the agent's side once its message is sent.
"""

from __future__ import annotations

import asyncio
import os
import socket

from netlab.mesh import zds
from netlab.mesh.nodeagent.agent import ZtunnelConn


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_requests_go_ahead_of_their_acks_up_to_the_window() -> None:
    async def run() -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn = ZtunnelConn(zds.ZdsSocket(a), "test")
        peer = zds.ZdsSocket(b)
        reader = asyncio.get_running_loop().create_task(conn.read_acks())
        before = open_fds()
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(5)]
        items: list[tuple[zds.Request, int | None]] = [
            (zds.AddWorkload(f"uid-{i}", zds.WorkloadInfo(f"p{i}", "ns", "sa")), fd) for i, fd in enumerate(fds)]
        items.append((zds.SnapshotSent(), None))
        sending = asyncio.get_running_loop().create_task(conn.requests(iter(items), window=3))

        async def take() -> tuple[zds.Request, list[int]]:
            data, got = await asyncio.wait_for(peer.recv(), 2)
            return zds.decode_request(data), got

        seen = [await take() for _ in range(3)]  # three arrive with no ack sent yet
        await asyncio.sleep(0.05)
        b.setblocking(False)
        try:
            b.recv(1)
            raise AssertionError("a fourth request went out before any ack")
        except BlockingIOError:
            pass
        for _ in range(3):
            await peer.send(zds.encode_response(zds.Ack()))
            seen.append(await take())
        for _ in range(3):
            await peer.send(zds.encode_response(zds.Ack("no" if not _ else "")))
        acks = await asyncio.wait_for(sending, 2)
        assert [type(r).__name__ for r, _ in seen] == ["AddWorkload"] * 5 + ["SnapshotSent"]
        assert [r.uid for r, _ in seen[:5]] == [f"uid-{i}" for i in range(5)]  # type: ignore[union-attr]
        assert [len(f) for _, f in seen] == [1] * 5 + [0]
        assert [a.error for a in acks] == ["", "", "", "no", "", ""]
        for _, got in seen:
            for fd in got:
                assert os.path.samestat(os.fstat(fd), os.stat(os.devnull))
                os.close(fd)
        assert open_fds() == before  # the agent's copies were closed once sent
        peer.close()
        await asyncio.wait_for(reader, 2)
        conn.sock.close()

    asyncio.run(run())
