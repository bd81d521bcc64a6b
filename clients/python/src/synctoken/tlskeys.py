"""Which keys gRPC's TLS can present, on either side of a handshake: one rule for the server and the client.

Found by real handshakes with a synctoken server (grpcio 1.85, BoringSSL at
both ends; tests/clients/python/test_client_key_types.py keeps asking gRPC,
and the server's certificate tests ask it to bind): RSA keys and ECDSA keys on
P-256 or P-384 work. ECDSA P-521 and Ed25519 keys load, but every handshake
fails (BoringSSL does not offer their signature schemes); with an Ed448, DSA,
secp256k1 or RSA-PSS key (RSA-PSS in the certificate or in the key file
alone) gRPC cannot even set up TLS. Either way the first handshake would fail
as if the peer were at fault, so such a key is refused where it is taken.

RSA keys under 2048 bits work with gRPC, but are refused as weak: this
system's OpenSSL (security level 2) refused them in certificate files
already, saying less, and a weak key should not guard a token service.

Here, in the client distribution, because both programs take keys: the
server (synctoken_server.config.tlsfiles) and the client (its certificate
files and its X509-SVIDs), and the same kinds are usable on both sides.
"""

from __future__ import annotations

import base64
import binascii
import re

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import PublicKeyAlgorithmOID

USABLE_KEYS = "RSA keys of 2048 bits or more and ECDSA keys on P-256 or P-384"
"""What is usable, for a sentence that says who presents them ("a client presents ...")."""
MIN_RSA_BITS = 2048
_CURVES = frozenset({"secp256r1", "secp384r1"})
_KINDS: tuple[tuple[type, str], ...] = (
    (ed25519.Ed25519PrivateKey, "an Ed25519 key"),
    (ed448.Ed448PrivateKey, "an Ed448 key"),
    (x25519.X25519PrivateKey, "an X25519 key"),
    (x448.X448PrivateKey, "an X448 key"),
)
# By class name: cryptography (47 on) deprecates the dsa module's classes, and naming one at import would
# warn in every program that imports this rule (the client's users', the BFF at start).
_KINDS_BY_NAME = {"DSAPrivateKey": "a DSA key"}
# The PKCS#8 block of a PEM key file, and the rsassaPss OID as DER (tag, length, contents).
_PKCS8_PEM = re.compile(rb"-----BEGIN PRIVATE KEY-----(.*?)-----END PRIVATE KEY-----", re.DOTALL)
_RSASSA_PSS = b"\x06\x09" + bytes.fromhex("2a864886f70d01010a")


def unusable_key(key: PrivateKeyTypes, certificate: x509.Certificate, key_pem: bytes | None = None) -> str:
    """Why `key`, with `certificate` its leaf, cannot be used ("an Ed25519 key, which gRPC cannot present"), or "".

    `key_pem`: the key file's PEM, as gRPC will read it; None when gRPC gets
    the key as cryptography writes it. cryptography loads an RSA-PSS key as a
    plain RSA key, and writes it so, so only the file's own PKCS#8 says
    RSA-PSS (beside an ordinary RSA certificate, which is otherwise usable).
    """
    if isinstance(key, rsa.RSAPrivateKey):
        pss = certificate.public_key_algorithm_oid == PublicKeyAlgorithmOID.RSASSA_PSS
        if pss or (key_pem is not None and _pkcs8_names_rsa_pss(key_pem)):
            return "an RSA-PSS key, which gRPC cannot present"
        return "" if key.key_size >= MIN_RSA_BITS else f"a {key.key_size}-bit RSA key, too weak"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name in _CURVES:
            return ""
        return f"an ECDSA key on curve {key.curve.name}, which gRPC cannot present"
    kind = next((name for cls, name in _KINDS if isinstance(key, cls)), None) or _KINDS_BY_NAME.get(
        type(key).__name__, f"a {type(key).__name__}"
    )
    return f"{kind}, which gRPC cannot present"


def _pkcs8_names_rsa_pss(key_pem: bytes) -> bool:
    """Whether the PEM's PKCS#8 key names rsassaPss as its algorithm.

    cryptography has no DER decoder at its lower bound here (46; hazmat.asn1
    decodes from later releases), so this reads the three headers in front of
    the algorithm's OID, in a key cryptography has loaded already:
    PrivateKeyInfo ::= SEQUENCE { version INTEGER (3 bytes), privateKeyAlgorithm SEQUENCE { algorithm OID, ... }, ... }
    """
    found = _PKCS8_PEM.search(key_pem)
    if found is None:
        return False  # PKCS#1 ("RSA PRIVATE KEY") names no algorithm: the certificate's is the key's
    try:
        der = base64.b64decode(found.group(1))
    except binascii.Error:
        return False
    at = _after_header(der, 0) + 3
    at = _after_header(der, at)
    return der[at : at + len(_RSASSA_PSS)] == _RSASSA_PSS


def _after_header(der: bytes, at: int) -> int:
    """Where the contents of the DER element at `at` begin: after its tag and its length (short or long form)."""
    length = der[at + 1] if at + 1 < len(der) else 0
    return at + 2 + (length & 0x7F if length & 0x80 else 0)
