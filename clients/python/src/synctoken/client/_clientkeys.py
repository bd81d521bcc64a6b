"""Which keys a client certificate may have: the kinds gRPC's TLS can handshake with, told from their DER.

Found by real handshakes with a synctoken server (grpcio 1.85, BoringSSL at
both ends; tests/clients/python/test_client_key_types.py keeps asking gRPC):
RSA keys and ECDSA keys on P-256 or P-384 work. ECDSA P-521 and Ed25519 keys
load, but every handshake fails (the server's TLS does not offer their
signature schemes); with an Ed448, DSA, secp256k1 or RSA-PSS key (RSA-PSS in
the certificate or in the key file alone) gRPC cannot even set up TLS. Either
way the first call would fail as if the server were at fault, so such a key is
refused where the client takes it.

RSA keys under 2048 bits work with gRPC, but are refused too, as the server
refuses one of its own: this system's OpenSSL (security level 2) refused them
in certificate files already, saying less, and a weak key should not call a
token service whichever way it arrives.

Read from the DER by hand, without a crypto library: a client that reads
certificate files depends on grpcio alone. The server's own check
(synctoken_server.config.tlsfiles) asks cryptography, which it has.
"""

from __future__ import annotations

CLIENT_KEYS = "a client presents RSA keys of 2048 bits or more and ECDSA keys on P-256 or P-384"
_MIN_RSA_BITS = 2048

# AlgorithmIdentifier OIDs, as their DER contents.
_RSA = bytes.fromhex("2a864886f70d010101")
_EC = bytes.fromhex("2a8648ce3d0201")
_USABLE_CURVES = frozenset({bytes.fromhex("2a8648ce3d030107"), bytes.fromhex("2b81040022")})  # P-256, P-384
_CURVE_NAMES = {
    bytes.fromhex("2b81040023"): "secp521r1",
    bytes.fromhex("2b8104000a"): "secp256k1",
    bytes.fromhex("2b81040021"): "secp224r1",
}
_KINDS = {
    bytes.fromhex("2a864886f70d01010a"): "an RSA-PSS key",
    bytes.fromhex("2b6570"): "an Ed25519 key",
    bytes.fromhex("2b6571"): "an Ed448 key",
    bytes.fromhex("2a8648ce380401"): "a DSA key",
}
_OID, _SEQUENCE, _EXPLICIT_0 = 0x06, 0x30, 0xA0

# One DER element: its tag, and where its contents begin and end.
_Element = tuple[int, int, int]


def unusable_key(certificate_der: bytes, pkcs8_key_der: bytes | None) -> str:
    """Why the certificate's key cannot be used ("an Ed25519 key, which gRPC cannot present"), or "" if it can.

    `pkcs8_key_der`: the private key as PKCS#8, whose algorithm is checked too
    (an RSA-PSS key beside an RSA certificate); None for a key in a format
    that names no algorithm of its own (PKCS#1 RSA, SEC 1 EC): the
    certificate's, which it matches, is its kind.
    """
    try:
        tbs = _children(certificate_der, _element(certificate_der, 0))[0]
        fields = _children(certificate_der, tbs)
        if fields[0][0] == _EXPLICIT_0:  # the version
            fields = fields[1:]
        # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
        algorithm, public_key = _children(certificate_der, fields[5])
        kind = _kind(certificate_der, algorithm)
        if not kind and pkcs8_key_der is not None:
            # version, privateKeyAlgorithm, privateKey
            kind = _kind(pkcs8_key_der, _children(pkcs8_key_der, _element(pkcs8_key_der, 0))[1])
        if kind:
            return f"{kind}, which gRPC cannot present"
        bits = _rsa_bits(certificate_der, algorithm, public_key)
    except (IndexError, ValueError):
        # OpenSSL (files) or cryptography (SVIDs) has parsed both already; should this reader
        # not follow, gRPC is left to judge rather than a usable key refused.
        return ""
    return f"a {bits}-bit RSA key, too weak" if bits and bits < _MIN_RSA_BITS else ""


def _kind(der: bytes, algorithm: _Element) -> str:
    parts = _children(der, algorithm)
    oid = _contents(der, parts[0])
    if oid == _RSA:
        return ""
    if oid == _EC:
        parameters = parts[1:2]  # a named curve's OID, else explicit parameters
        if not parameters or parameters[0][0] != _OID:
            return "an ECDSA key with explicit curve parameters"
        curve = _contents(der, parameters[0])
        if curve in _USABLE_CURVES:
            return ""
        return f"an ECDSA key on curve {_CURVE_NAMES.get(curve) or _dotted(curve)}"
    return _KINDS.get(oid) or f"a key of algorithm {_dotted(oid)}"


def _rsa_bits(der: bytes, algorithm: _Element, public_key: _Element) -> int:
    """The modulus size of an RSA public key; 0 for other kinds."""
    if _contents(der, _children(der, algorithm)[0]) != _RSA:
        return 0
    # A BIT STRING: one byte of unused bits, then RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
    modulus = _children(der, _element(der, public_key[1] + 1))[0]
    return int.from_bytes(_contents(der, modulus)).bit_length()


def _element(der: bytes, at: int) -> _Element:
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:  # long form: the next (length & 0x7f) bytes hold the length
        count = length & 0x7F
        length = int.from_bytes(der[at : at + count])
        at += count
    if at + length > len(der):
        raise ValueError("a DER element runs past its end")
    return tag, at, at + length


def _children(der: bytes, parent: _Element) -> list[_Element]:
    if parent[0] != _SEQUENCE and parent[0] != _EXPLICIT_0:
        raise ValueError("not a constructed DER element")
    found, at = [], parent[1]
    while at < parent[2]:
        child = _element(der, at)
        found.append(child)
        at = child[2]
    return found


def _contents(der: bytes, element: _Element) -> bytes:
    return der[element[1] : element[2]]


def _dotted(oid: bytes) -> str:
    # The first byte holds the first two arcs; the rest are base-128, high bit set on all but a number's last byte.
    arcs, value = [oid[0] // 40, oid[0] % 40], 0
    for byte in oid[1:]:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(map(str, arcs))
