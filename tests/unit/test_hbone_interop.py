"""HBONE against an HTTP/2 implementation that is not ours: Node.js's ``http2`` module (nghttp2 inside).

Both directions, real processes on loopback, mTLS with the lab CA:

* Node as the client of our :class:`~netlab.mesh.hbone.HboneServer` (ztunnel's 15008): CONNECT,
  MiBs each way (past our 4 MiB window and Node's 64 KiB one, so both sides' WINDOW_UPDATEs and
  frame sizes are exercised), half-close, the reply to EOF;
* Node as the HBONE server our :func:`~netlab.mesh.hbone.hbone_connect` dials (as ztunnel's
  outbound dials a peer's 15008), which sees our client certificate.

And each side refuses a peer without a certificate from the lab's trust domain. Node's defaults
are the RFC's (16 KiB frames, 65535-byte windows), not ours, so the framing layer must honour
what the peer's SETTINGS say.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from netlab.mesh.hbone import HboneError, hbone_connect
from netlab.mesh.relay import StreamReset, tcp_connect
from tests.unit import test_hbone
from tests.unit.test_hbone import CLIENT_ID, SERVER_ID, SERVER_IP, Upstream, run, start_server

pki = test_hbone.pki  # the same lab CA and certificates (a module-scoped fixture)

NODE = shutil.which("node") or shutil.which("nodejs")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js not installed (Debian: nodejs)")

SCRIPT = r"""
const http2 = require('http2'), fs = require('fs'), crypto = require('crypto');
const a = JSON.parse(process.argv[2]);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const pattern = (n) => { const b = Buffer.alloc(n); for (let i = 0; i < n; i++) b[i] = (i * 7 + (i >> 10)) & 255; return b; };
const tls = {ca: fs.readFileSync(a.ca)};
if (a.cert) { tls.cert = fs.readFileSync(a.cert); tls.key = fs.readFileSync(a.key); }
if (a.mode === 'client') {
  const s = http2.connect(`https://${a.host}:${a.port}`, {...tls, servername: 'hbone',
    checkServerIdentity: (h, cert) => (cert.subjectaltname || '').split(', ').includes('URI:' + a.expect)
      ? undefined : new Error('server identity ' + cert.subjectaltname)});
  s.on('error', (e) => { out({error: String(e)}); process.exit(0); });
  const req = s.request({':method': 'CONNECT', ':authority': a.authority});
  let status = null, n = 0; const h = crypto.createHash('sha256');
  req.on('response', (hd) => { status = hd[':status']; });
  req.on('data', (d) => { n += d.length; h.update(d); });
  req.on('end', () => { out({status, bytes: n, sha256: h.digest('hex')}); s.close(); });
  req.on('error', (e) => { out({status, error: String(e)}); s.close(); });
  const body = pattern(a.size);
  for (let i = 0; i < body.length; i += 100000) req.write(body.subarray(i, i + 100000));
  req.end();
} else {
  const srv = http2.createSecureServer({...tls, requestCert: true, rejectUnauthorized: true});
  srv.on('stream', (st, hd) => {
    const peer = st.session.socket.getPeerCertificate().subjectaltname;
    if (hd[':method'] !== 'CONNECT') { st.respond({':status': 405}, {endStream: true}); return; }
    st.respond({':status': 200});
    let n = 0; const h = crypto.createHash('sha256');
    st.on('data', (d) => { n += d.length; h.update(d); });
    st.on('end', () => {
      const digest = h.digest();
      out({authority: hd[':authority'], peer, bytes: n, sha256: digest.toString('hex')});
      st.write(digest); st.end(pattern(a.size));
    });
  });
  srv.on('tlsClientError', (e) => out({tls_error: String(e)}));
  srv.listen(0, a.host, () => out({port: srv.address().port}));
}
"""


def pattern(n: int) -> bytes:
    """The bytes the Node script sends (its ``pattern``)."""
    return bytes((i * 7 + (i >> 10)) & 255 for i in range(n))


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("node") / "h2peer.js"
    p.write_text(SCRIPT)
    return p


async def node_client(script: Path, args: dict) -> dict:
    proc = await asyncio.create_subprocess_exec(NODE, str(script), json.dumps(args), stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:  # timed out: our own child, by its handle
            proc.kill()
            await proc.wait()
    lines = out.decode().splitlines()
    assert lines, f"node printed nothing; stderr: {err.decode()[-500:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("size", [100, 6 << 20])
def test_node_http2_client_through_our_hbone_server(pki, script, size):
    """Node CONNECTs through HboneServer to an app: the app gets Node's bytes and EOF, Node gets
    the app's reply (sha256 of what it got + 5 MiB) and the end of the stream."""
    reply = bytes(range(256)) * (5 << 12)
    seen: list[str | None] = []

    async def main():
        up = await Upstream(reply=reply).start()
        srv = await start_server(pki, up.addr)

        async def handler(req):
            seen.append(req.peer_identity)
            return await tcp_connect(up.addr)

        srv.handler = handler
        cert, key = pki["client"]
        res = await node_client(script, {"mode": "client", "host": SERVER_IP, "port": srv.sockname[1],
                                         "authority": f"{SERVER_IP}:8080", "ca": str(pki["ca"]), "cert": str(cert),
                                         "key": str(key), "expect": SERVER_ID, "size": size})
        await asyncio.sleep(0.1)
        await srv.close()
        await up.close()
        return res, up.got

    res, got = run(main(), 60)
    sent = pattern(size)
    assert res.get("status") == 200, res
    assert got == [sent]
    want = hashlib.sha256(sent).digest() + reply
    assert (res["bytes"], res["sha256"]) == (len(want), hashlib.sha256(want).hexdigest())
    assert seen == [CLIENT_ID]


def test_node_http2_client_without_certificate_is_refused(pki, script):
    async def main():
        up = await Upstream().start()
        srv = await start_server(pki, up.addr)
        res = await node_client(script, {"mode": "client", "host": SERVER_IP, "port": srv.sockname[1],
                                         "authority": f"{SERVER_IP}:8080", "ca": str(pki["ca"]), "expect": SERVER_ID,
                                         "size": 10})
        await srv.close()
        await up.close()
        return res, up.got, srv.stats

    res, got, stats = run(main(), 60)
    assert "error" in res and res.get("status") is None, res
    assert got == []
    assert stats["tls_failed"] >= 1


class NodeServer:
    """The Node script as an HBONE server on 127.0.0.1 (port chosen by the kernel)."""

    def __init__(self, script: Path, pki: dict, reply_size: int) -> None:
        cert, key = pki["server"]
        self.args = {"mode": "server", "host": "127.0.0.1", "ca": str(pki["ca"]), "cert": str(cert), "key": str(key),
                     "size": reply_size}
        self.script = script

    async def __aenter__(self) -> NodeServer:
        self.proc = await asyncio.create_subprocess_exec(NODE, str(self.script), json.dumps(self.args),
                                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        self.port = json.loads(line)["port"]
        return self

    async def event(self) -> dict:
        assert self.proc.stdout is not None
        return json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 20))

    async def __aexit__(self, *exc: object) -> None:
        self.proc.terminate()  # our own child
        await self.proc.wait()


@pytest.mark.parametrize("size", [100, 6 << 20])
def test_our_hbone_client_to_a_node_http2_server(pki, script, size):
    """hbone_connect dials Node: Node sees CONNECT with our authority and our SPIFFE identity, gets
    our bytes and END_STREAM; we get its reply (its sha256 of them + 6 MiB in 16 KiB frames) to EOF."""
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    async def main():
        async with NodeServer(script, pki, 6 << 20) as node:
            cert, key = pki["client"]
            s = await hbone_connect(("127.0.0.1", node.port), "10.0.0.9:8080", client_cert=cert, client_key=key,
                                    ca=pki["ca"], expected_identity=SERVER_ID, timeout=10)
            s.write(body)
            s.write_eof()
            got = await s.read_all()
            ev = await node.event()
            await s.wait_closed()
            return s.status, got, ev

    status, got, ev = run(main(), 60)
    assert status == 200
    assert ev["authority"] == "10.0.0.9:8080"
    assert f"URI:{CLIENT_ID}" in ev["peer"].split(", ")
    assert (ev["bytes"], ev["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert got == hashlib.sha256(body).digest() + pattern(6 << 20)


def test_node_http2_server_refuses_a_client_of_another_ca(pki, script):
    """Node checks our client certificate against the lab CA: one from another CA gets no stream
    (TLS 1.3: the verdict may come after our side of the handshake, then as a reset)."""
    async def main():
        async with NodeServer(script, pki, 10) as node:
            cert, key = pki["evil_client"]
            try:
                s = await hbone_connect(("127.0.0.1", node.port), "10.0.0.9:8080", client_cert=cert, client_key=key,
                                        ca=pki["ca"], expected_identity=SERVER_ID, timeout=10)
                s.write(b"x")
                s.write_eof()
                outcome: object = await s.read_all()
            except (HboneError, StreamReset, ConnectionError) as e:
                outcome = e
            return outcome, await node.event()

    outcome, ev = run(main(), 60)
    assert isinstance(outcome, Exception), f"the stream went through: {outcome!r}"
    assert "tls_error" in ev, ev
