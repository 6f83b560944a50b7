"""Cryptography of the control-channel handshake.

Definitions (MeshAgent meshcore/agentcore.c, MeshCentral certoperations.js):

* the TLS hash is SHA-384 of the DER of the server's TLS certificate;
* the key hash of a certificate is SHA-384 of the bytes inside its subjectPublicKey bit string,
  which for RSA is the PKCS#1 RSAPublicKey DER. The agent's ServerID setting contains the key hash
  of the server's agent certificate, and the agent's node id is the key hash of its own
  certificate;
* the agent signs ``X || server nonce || agent nonce`` with RSASSA-PKCS1-v1_5 and SHA-384,
  where X is the hash that the server sent in its AuthRequest;
* the server signs ``TLS hash || agent nonce || server nonce``: the nonce order is reversed.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from lab.errors import LocalProtocolError, PeerProtocolError


def certificate_hash(certificate_der: bytes) -> bytes:
    return hashlib.sha384(certificate_der).digest()


def public_key_hash(certificate: x509.Certificate) -> bytes:
    """Return the key hash of an RSA certificate: SHA-384 of its PKCS#1 public key DER."""
    public_key = certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise LocalProtocolError(f"certificate key is {type(public_key).__name__}; MeshAgent requires RSA")
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return hashlib.sha384(der).digest()


def sign_server_proof(key: rsa.RSAPrivateKey, tls_hash: bytes, agent_nonce: bytes, server_nonce: bytes) -> bytes:
    return key.sign(tls_hash + agent_nonce + server_nonce, padding.PKCS1v15(), hashes.SHA384())


def verify_agent_proof(
    certificate_der: bytes, signature: bytes, sent_hash: bytes, server_nonce: bytes, agent_nonce: bytes
) -> bytes:
    """Verify the agent's AuthVerify signature and return its 48-byte node id.

    Raises PeerProtocolError when the certificate cannot be parsed, is not RSA, or the
    signature does not verify. Windows agents whose key lives in the certificate store sign
    with PKCS#7 instead. The lab does not verify those, so it rejects them with a clear message.
    """
    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
    except ValueError as error:
        raise PeerProtocolError(f"agent certificate of {len(certificate_der)} bytes is not valid DER: {error}") from None
    public_key = certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise PeerProtocolError(f"agent certificate key is {type(public_key).__name__}, expected RSA")
    if len(signature) * 8 != public_key.key_size:
        raise PeerProtocolError(
            f"agent signature is {len(signature)} bytes for a {public_key.key_size}-bit key; "
            "PKCS#7 signatures from Windows certificate-store keys are not supported"
        )
    try:
        public_key.verify(signature, sent_hash + server_nonce + agent_nonce, padding.PKCS1v15(), hashes.SHA384())
    except InvalidSignature:
        raise PeerProtocolError("agent signature over the handshake nonces is invalid") from None
    return public_key_hash(certificate)


def format_node_id(node_id: bytes) -> str:
    """Format a node id the way MeshCentral shows it: base64 with ``+`` as ``@``, ``/`` as ``$``."""
    return base64.b64encode(node_id).decode().replace("+", "@").replace("/", "$")
