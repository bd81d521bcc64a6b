"""The shared key rule's own reading of a PKCS#8 key file (synctoken.tlskeys) on hostile PEM: a bool, never a raise.

The RSA-PSS check reads DER headers by hand (cryptography has no DER decoder
at its lower bound), on the bytes of whatever key file it is given; the server
(its key file) and the client (its key files) both call it. Real keys from
openssl and cryptography are cut, lengthened, flipped and re-encoded a few
hundred ways, from a fixed seed so a failure is reproducible.
"""

from __future__ import annotations

import base64
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support.constants import BFF_ID
from support.pki import KEY_KINDS, Pki, issue_with_key
from synctoken import tlskeys
from synctoken_server.dev.pki import LeafSpec

SEED = 20261208
MUTANTS_PER_KEY = 300


def _pem(der: bytes, label: bytes = b"PRIVATE KEY") -> bytes:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64)).encode()
    return b"-----BEGIN " + label + b"-----\n" + body + b"\n-----END " + label + b"-----\n"


def _der(pem: bytes) -> bytes:
    return serialization.load_pem_private_key(pem, password=None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pss_der(tmp_path: Path, pki: Pki) -> bytes:
    pair = issue_with_key(pki.ca, LeafSpec("bff", uris=(BFF_ID,)), "rsa-pss", tmp_path)
    body = b"".join(pair.key_pem.split(b"-----")[2].split())
    return base64.b64decode(body)


def _rng(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")  # noqa: S311 - test inputs, not secrets; seeded so a failure reruns the same


def _mutants(der: bytes, rng: random.Random) -> list[bytes]:
    """Hostile variants of `der`: cut short, long-form and indefinite lengths, bytes past the end, flips, noise."""
    found: list[bytes] = [der[:cut] for cut in range(min(len(der), 40))]
    found += [der[:1] + bytes([length]) + der[2:] for length in (0x80, 0x81, 0x84, 0x8F, 0xFF)]
    # The algorithm's SEQUENCE header (after the outer header and the 3-byte version) given a long-form length.
    at = 4 + 3 if der[1] & 0x80 else 2 + 3
    found += [der[: at + 1] + bytes([0x80 | n]) + b"\xff" * n for n in range(1, 9)]
    found += [der + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(8)]
    while len(found) < MUTANTS_PER_KEY:
        mutant = bytearray(der[: rng.randrange(len(der) + 1)])
        for _ in range(rng.randrange(1, 6)):
            if mutant:
                mutant[rng.randrange(len(mutant))] = rng.randrange(256)
        if rng.random() < 0.3:
            mutant[rng.randrange(len(mutant) + 1) : 0] = bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
        found.append(bytes(mutant))
    return found


@pytest.fixture(scope="module")
def real_keys(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> dict[str, bytes]:
    """PKCS#8 DER of an RSA-PSS key (openssl's), an RSA key and an ECDSA key (cryptography's)."""
    directory = tmp_path_factory.mktemp("tlskeys")
    return {
        "rsa-pss": _pss_der(directory, pki),
        "rsa-2048": _der(pki.ca.issue(LeafSpec("bff", uris=(BFF_ID,)), key=KEY_KINDS["rsa-2048"]()).key_pem),
        "ecdsa-p256": _der(pki.ca.issue(LeafSpec("bff", uris=(BFF_ID,)), key=KEY_KINDS["ecdsa-p256"]()).key_pem),
    }


def test_real_keys_read_right(real_keys: dict[str, bytes]) -> None:
    """The reading the fuzzing relies on: openssl's RSA-PSS PKCS#8 says RSA-PSS, RSA and ECDSA keys do not."""
    assert tlskeys._pkcs8_names_rsa_pss(_pem(real_keys["rsa-pss"])) is True
    assert tlskeys._pkcs8_names_rsa_pss(_pem(real_keys["rsa-2048"])) is False
    assert tlskeys._pkcs8_names_rsa_pss(_pem(real_keys["ecdsa-p256"])) is False


@pytest.mark.parametrize("kind", ["rsa-pss", "rsa-2048", "ecdsa-p256"])
def test_mutated_der_gives_a_bool(real_keys: dict[str, bytes], kind: str) -> None:
    """Hundreds of cut, lengthened, flipped and padded PKCS#8 bodies: each read is True or False, none raises."""
    rng = _rng(kind)
    mutants = _mutants(real_keys[kind], rng)
    assert len(mutants) >= MUTANTS_PER_KEY
    for mutant in mutants:
        assert tlskeys._pkcs8_names_rsa_pss(_pem(mutant)) in (True, False), mutant.hex()


def test_hostile_pem_text_gives_a_bool() -> None:
    """PEM text that is no base64, mis-padded, binary, unterminated or nested: False, never an exception."""
    rng = _rng("pem")
    bodies = [
        b"not base64 at all!",
        b"QUJD",  # "ABC": too short to hold any header
        b"QQ",  # bad padding
        b"Q===",
        b"\x00\xff\xfe" * 50,
        "é€".encode() * 20,
        b"-----BEGIN PRIVATE KEY-----",  # a second begin inside
        *(bytes(rng.randrange(256) for _ in range(rng.randrange(200))) for _ in range(200)),
    ]
    for body in bodies:
        text = b"-----BEGIN PRIVATE KEY-----\n" + body + b"\n-----END PRIVATE KEY-----\n"
        assert tlskeys._pkcs8_names_rsa_pss(text) in (True, False), body
        assert tlskeys._pkcs8_names_rsa_pss(text[: len(text) // 2]) is False  # never terminated
    assert tlskeys._pkcs8_names_rsa_pss(b"") is False


def test_unusable_key_takes_a_hostile_key_file(pki: Pki, real_keys: dict[str, bytes]) -> None:
    """The rule a caller applies (unusable_key) answers for any key file text beside a usable key: "" or why."""
    pair = pki.ca.issue(LeafSpec("bff", uris=(BFF_ID,)), key=KEY_KINDS["rsa-2048"]())
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    certificate = x509.load_pem_x509_certificate(pair.cert_pem)
    assert tlskeys.unusable_key(key, certificate, pair.key_pem) == ""
    rng = _rng("unusable")
    for mutant in _mutants(real_keys["rsa-pss"], rng):
        answer = tlskeys.unusable_key(key, certificate, _pem(mutant))
        assert answer in ("", "an RSA-PSS key, which gRPC cannot present"), mutant.hex()


def test_import_warns_nothing() -> None:
    """Importing the rule names no deprecated cryptography class (DSA's): no warning in the programs that use it."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import synctoken.tlskeys"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
