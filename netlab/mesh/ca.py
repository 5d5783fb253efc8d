"""Lab certificate authority: SPIFFE workload certificates for HBONE mTLS (reference §5.1).

Istio's control plane (istiod as CA) signs one certificate per workload identity; ztunnel fetches
one per identity it serves (ZT-TLS). In the lab one ``LabCA`` per state directory plays istiod:
it signs EC P-256 leaf certificates whose only name is a URI SAN
``spiffe://<trust-domain>/ns/<ns>/sa/<sa>`` (empty subject, SAN critical, like Istio's), so peers
must identify each other by URI SAN, never by CN or hostname.

Files live under the lab state directory so every proxy process of a lab (ztunnels, sidecars,
waypoints) shares the same trust root without talking to each other::

    <dir>/ca-cert.pem  <dir>/ca-key.pem
    <dir>/certs/<td>_ns_<ns>_sa_<sa>/cert.pem, key.pem   (netlab.names.cert_dir_name: one-to-one)

``issue`` is idempotent and safe against concurrent callers in other processes: a leaf is written
into a private temporary directory and published with one atomic ``rename``; a loser of the race
discards its copy and uses the winner's, so a cert never pairs with the wrong key.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from netlab import state
from netlab.istio import TRUST_DOMAIN, spiffe_id
from netlab.names import BadName, cert_dir_name

__all__ = ["CAError", "LabCA", "spiffe_id", "trust_domain_of", "uri_sans"]

CA_COMMON_NAME = "netlab lab CA"
CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CERTS_DIR = state.CA_CERTS
LEAF_CERT_FILE = "cert.pem"
LEAF_KEY_FILE = "key.pem"
CA_VALIDITY = _dt.timedelta(days=3650)
LEAF_VALIDITY = _dt.timedelta(days=365)  # a lab outlives Istio's 24 h rotation; no rotation here
CLOCK_SKEW = _dt.timedelta(hours=1)
SPIFFE_SCHEME = "spiffe://"


class CAError(Exception):
    """The CA directory is missing, already exists, or an identity is malformed."""


def trust_domain_of(identity: str) -> str:
    """``spiffe://td/ns/x/sa/y`` -> ``td``; raises CAError for anything not a SPIFFE URI."""
    if not identity.startswith(SPIFFE_SCHEME):
        raise CAError(f"not a SPIFFE identity: {identity!r}")
    td, _, path = identity[len(SPIFFE_SCHEME) :].partition("/")
    if not td or not path:
        raise CAError(f"not a SPIFFE identity: {identity!r}")
    return td


def uri_sans(cert: x509.Certificate | bytes | str | os.PathLike[str]) -> list[str]:
    """URI SANs of a certificate (object, PEM bytes, or PEM file path)."""
    if isinstance(cert, (str, os.PathLike)):
        cert = Path(cert).read_bytes()
    if isinstance(cert, bytes):
        cert = x509.load_pem_x509_certificate(cert)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class LabCA:
    """A self-signed root that signs SPIFFE leaf certificates for one trust domain.

    ``LabCA.create(dir)`` makes a new root, ``LabCA.load(dir)`` reopens it, ``LabCA.open(dir)``
    does whichever applies. For negative tests make a second, unrelated root with
    ``LabCA.create(other_dir, trust_domain="evil.local", common_name="evil CA")``, or issue a
    foreign-trust-domain leaf from a trusted root with ``issue(..., strict=False)``.
    """

    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, trust_domain: str):
        self.dir = directory
        self.cert = cert
        self.key = key
        self.trust_domain = trust_domain
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def create(
        cls, directory: str | os.PathLike[str], trust_domain: str = TRUST_DOMAIN, common_name: str = CA_COMMON_NAME
    ) -> LabCA:
        """Create a new root in ``directory`` (made if missing); refuses to overwrite one."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if (d / CA_CERT_FILE).exists():
            raise CAError(f"a CA already exists in {d}")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(d / CA_KEY_FILE, _key_pem(key))
        # the cert is written last: its presence means "CA complete"
        tmp = d / f".{CA_CERT_FILE}.{os.getpid()}"
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, d / CA_CERT_FILE)
        return cls(d, cert, key, trust_domain)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> LabCA:
        """Reopen the root kept in ``directory``; the trust domain is read back from its O=."""
        d = Path(directory)
        try:
            cert = x509.load_pem_x509_certificate((d / CA_CERT_FILE).read_bytes())
            key = serialization.load_pem_private_key((d / CA_KEY_FILE).read_bytes(), password=None)
        except FileNotFoundError as e:
            raise CAError(f"no CA in {d}: {e.filename} missing") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{d / CA_KEY_FILE} is not an EC key")
        orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        td = str(orgs[0].value) if orgs else TRUST_DOMAIN
        return cls(d, cert, key, td)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], trust_domain: str = TRUST_DOMAIN) -> LabCA:
        """Load the root in ``directory`` or create it if there is none."""
        try:
            return cls.load(directory)
        except CAError:
            try:
                return cls.create(directory, trust_domain)
            except CAError:  # another process created it meanwhile
                return cls.load(directory)

    # --- paths --------------------------------------------------------------------------------
    @property
    def ca_cert_path(self) -> Path:
        """PEM of the root: the ``ca`` argument of HBONE clients and servers."""
        return self.dir / CA_CERT_FILE

    def leaf_dir(self, identity: str) -> Path:
        """Where ``identity``'s leaf lives: one directory per identity, never shared (cert_dir_name)."""
        trust_domain_of(identity)
        try:
            return self.dir / CERTS_DIR / cert_dir_name(identity)
        except BadName as e:
            raise CAError(str(e)) from None

    # --- issuing ------------------------------------------------------------------------------
    def issue(self, identity: str, strict: bool = True) -> tuple[Path, Path]:
        """Return ``(cert_pem_path, key_pem_path)`` for ``identity``, signing it on first use.

        ``strict`` refuses identities outside this CA's trust domain; pass ``strict=False`` to
        mint a foreign-trust-domain cert that still chains to this root (negative tests of the
        server's trust-domain check).
        """
        td = trust_domain_of(identity)
        if strict and td != self.trust_domain:
            raise CAError(f"{identity} is outside trust domain {self.trust_domain}")
        final = self.leaf_dir(identity)
        cert_path, key_path = final / LEAF_CERT_FILE, final / LEAF_KEY_FILE
        if cert_path.exists():
            return cert_path, key_path
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".issue-", dir=final.parent))
        try:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = self._sign_leaf(identity, key.public_key())
            _write_private(tmp / LEAF_KEY_FILE, _key_pem(key))
            (tmp / LEAF_CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            try:
                os.rename(tmp, final)
            except OSError:
                if not cert_path.exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cert_path, key_path

    def issue_workload(self, namespace: str, service_account: str) -> tuple[Path, Path]:
        """``issue(spiffe_id(namespace, service_account, self.trust_domain))``."""
        return self.issue(spiffe_id(namespace, service_account, self.trust_domain))

    def _sign_leaf(self, identity: str, public_key: ec.EllipticCurvePublicKey) -> x509.Certificate:
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # Istio workload certs: empty subject, identity in SAN only
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + LEAF_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(self._aki, critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
            .sign(self.key, hashes.SHA256())
        )
