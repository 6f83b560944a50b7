"""Certificates generated for each lab run.

One self-signed RSA-3072 certificate serves as both the TLS certificate of the listener and the
agent certificate that signs the handshake, as MeshAgent's test/update-test.js does. Using one
certificate for both also keeps the recovery-core download on the control channel's
certificate, which the recovery core requires.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from lab.protocol.auth import certificate_hash, public_key_hash


@dataclasses.dataclass(frozen=True)
class ServerIdentity:
    """The certificate and key of one lab server, with the hashes the handshake uses."""

    certificate: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def tls_hash(self) -> bytes:
        return certificate_hash(self.certificate_der)

    @property
    def server_id(self) -> bytes:
        """Key hash of the certificate; the agent's .msh ServerID is its hex form."""
        return public_key_hash(self.certificate)

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def ssl_context(self) -> ssl.SSLContext:
        """Return a server-side TLS context that presents this certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # The agent does not validate the chain; the handshake checks the key hash instead.
        with tempfile.TemporaryDirectory(prefix="updatelab-tls-") as folder:
            certificate_path = Path(folder, "cert.pem")
            key_path = Path(folder, "key.pem")
            certificate_path.write_bytes(self.certificate_pem())
            key_path.write_bytes(self.key_pem())
            key_path.chmod(0o600)
            context.load_cert_chain(certificate_path, key_path)
        return context


def generate_identity(addresses: list[str] | None = None, *, common_name: str = "updatelab server") -> ServerIdentity:
    """Generate a self-signed RSA-3072 certificate valid for the given IP addresses."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alternative_names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for address in addresses or ["127.0.0.1"]:
        alternative_names.append(x509.IPAddress(ipaddress.ip_address(address)))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return ServerIdentity(certificate, key)
