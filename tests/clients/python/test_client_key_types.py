"""Which client keys gRPC can present, asked of gRPC itself: usable keys call, the others are refused up front.

Each kind is tried in a real handshake with a synctoken server on loopback,
from files and from the stand-in Workload API agent. A refused kind is also
tried in a bare gRPC channel, so that a gRPC that learns to present it makes
these tests fail, and the refusal can go (RSA-1024 works there: gRPC
handshakes with it, and the synctoken server refuses the caller as weak).
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from support.clients import RotatingFiles
from support.constants import BFF_ID
from support.inprocess import RunningServer
from support.pki import Pki, issue_with_key
from support.waiting import wait_for
from support.workloadagent import Svid, SvidSet, WorkloadAgent
from synctoken.client import CertificateFilesError, TokenClient, WorkloadApiTimeoutError
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1.token_service_pb2_grpc import TokenServiceStub
from synctoken_server.dev.pki import KeyPair, LeafSpec

CLIENT_KEYS = "a client presents RSA keys of 2048 bits or more and ECDSA keys on P-256 or P-384"
USABLE = ["rsa-2048", "ecdsa-p256", "ecdsa-p384"]
REFUSED = {
    "ecdsa-p521": "an ECDSA key on curve secp521r1, which gRPC cannot present",
    "ecdsa-secp256k1": "an ECDSA key on curve secp256k1, which gRPC cannot present",
    "ecdsa-brainpoolp256r1": "an ECDSA key on curve brainpoolP256r1, which gRPC cannot present",
    "ed25519": "an Ed25519 key, which gRPC cannot present",
    "ed448": "an Ed448 key, which gRPC cannot present",
    "dsa": "a DSA key, which gRPC cannot present",
    "rsa-pss": "an RSA-PSS key, which gRPC cannot present",
    "rsa-1024": "a 1024-bit RSA key, too weak",
}
"""Kinds the client refuses, and how the refusal names them."""
GRPC_CAN_PRESENT = {"rsa-1024"}
"""Refused kinds a bare gRPC channel presents all the same: the handshake completes, and the server refuses the
caller as weak (UNAUTHENTICATED), as the client refuses the key; not for gRPC's sake."""


def bff_pair(pki: Pki, kind: str, directory: Path) -> KeyPair:
    """The BFF's certificate from the suite's CA, with a key of `kind` (see support.pki.issue_with_key)."""
    spec = LeafSpec("bff", uris=(BFF_ID,), digital_signature=True)
    return issue_with_key(pki.ca, spec, kind, directory)


def traditional(pair: KeyPair) -> KeyPair:
    """The same pair with the key as PKCS#1 (RSA) or SEC 1 (EC): a PEM that names no algorithm."""
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    encoding = serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL
    return KeyPair(pair.cert_pem, key.private_bytes(*encoding, serialization.NoEncryption()))


def plain_grpc_call(pki: Pki, port: int, pair: KeyPair) -> grpc.StatusCode | None:
    """A GetCallerIdentity through a bare gRPC channel presenting `pair`: None if it worked, else its code."""
    credentials = grpc.ssl_channel_credentials(pki.ca.cert_pem, pair.key_pem, pair.cert_pem)
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        try:
            TokenServiceStub(channel).GetCallerIdentity(pb.GetCallerIdentityRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return None


def files(pki: Pki, directory: Path, pair: KeyPair) -> RotatingFiles:
    """`pair` written as a client's files beside the suite's CA."""
    written = RotatingFiles(directory, pki.directory / "ca.pem")
    written.write_in_place(pair)
    return written


class TestKeyFiles:
    """A key file gRPC cannot present is refused when the client is made, naming the file and what is usable."""

    @pytest.mark.parametrize("key_format", ["pkcs8", "traditional"])
    @pytest.mark.parametrize("kind", USABLE)
    def test_usable(self, pki: Pki, tmp_path: Path, shared_server: RunningServer, kind: str, key_format: str) -> None:
        """RSA 2048 and ECDSA P-256 and P-384 keys, PKCS#8 or not: the call works with them."""
        pair = bff_pair(pki, kind, tmp_path)
        pair = traditional(pair) if key_format == "traditional" else pair
        with TokenClient(f"localhost:{shared_server.port}", **files(pki, tmp_path, pair).kwargs()) as client:
            assert client.whoami().caller_id == BFF_ID

    @pytest.mark.parametrize(
        ("kind", "problem"),
        [*REFUSED.items(), ("rsa-pss-key-rsa-certificate", "an RSA-PSS key, which gRPC cannot present")],
    )
    def test_refused(self, pki: Pki, tmp_path: Path, shared_server: RunningServer, kind: str, problem: str) -> None:
        """gRPC cannot call with the key (or, for RSA-1024, can); the client refuses it at once, naming the key file."""
        pair = bff_pair(pki, kind, tmp_path)
        expected = grpc.StatusCode.UNAUTHENTICATED if kind in GRPC_CAN_PRESENT else grpc.StatusCode.UNAVAILABLE
        assert plain_grpc_call(pki, shared_server.port, pair) is expected
        written = files(pki, tmp_path, pair)
        with pytest.raises(CertificateFilesError) as caught:
            TokenClient(f"localhost:{shared_server.port}", **written.kwargs())
        # The whole message: the key's bytes are not in it.
        assert str(caught.value) == f"{written.key_file} holds {problem}; {CLIENT_KEYS}"

    def test_rotated_to_an_unusable_key(
        self, pki: Pki, tmp_path: Path, shared_server: RunningServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Files rotated to an Ed25519 pair: logged as not used, and calls go on with the pair in use."""
        written = files(pki, tmp_path, bff_pair(pki, "ecdsa-p256", tmp_path))
        with TokenClient(f"localhost:{shared_server.port}", **written.kwargs(), cert_check_interval=0.05) as client:
            assert client.whoami().caller_id == BFF_ID
            written.write_by_rename(bff_pair(pki, "ed25519", tmp_path))
            refusal = f"{written.key_file} holds an Ed25519 key, which gRPC cannot present; {CLIENT_KEYS}"
            wait_for(lambda: client.whoami().caller_id == BFF_ID and refusal in caplog.text)
            assert [r.levelno for r in caplog.records if refusal in r.getMessage()] == [logging.WARNING]

    def test_key_block_not_base64(self, pki: Pki, tmp_path: Path) -> None:
        """A key file whose PEM body is not base64: the usual refusal of the pair, not a crash in the key check."""
        pair = bff_pair(pki, "ecdsa-p256", tmp_path)
        broken = KeyPair(pair.cert_pem, b"-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n")
        written = files(pki, tmp_path, broken)
        with pytest.raises(CertificateFilesError, match=r"holds no whole PEM private key$"):
            TokenClient("localhost:1", **written.kwargs())


def svid(pki: Pki, kind: str, directory: Path) -> Svid:
    """The BFF's X509-SVID with a key of `kind`, as the agent hands it out."""
    return Svid(BFF_ID, bff_pair(pki, kind, directory), pki.ca.cert_pem)


class TestSvidKeys:
    """An X509-SVID whose key gRPC cannot present is not used: the first wait ends saying why; an update is skipped."""

    @pytest.mark.parametrize("kind", USABLE)
    def test_usable(
        self, pki: Pki, tmp_path: Path, workload_agent: WorkloadAgent, shared_server: RunningServer, kind: str
    ) -> None:
        """RSA 2048 and ECDSA P-256 and P-384 SVIDs: the call works with them."""
        workload_agent.start(SvidSet((svid(pki, kind, tmp_path),)))
        target = f"127.0.0.1:{shared_server.port}"
        with TokenClient.from_spiffe(target, endpoint_socket=workload_agent.address) as client:
            assert client.whoami().caller_id == BFF_ID

    @pytest.mark.parametrize(("kind", "problem"), REFUSED.items())
    def test_first_svid_refused(
        self, pki: Pki, tmp_path: Path, workload_agent: WorkloadAgent, kind: str, problem: str
    ) -> None:
        """The only SVID has such a key: the bounded first wait ends with the key's problem as what was last seen."""
        workload_agent.start(SvidSet((svid(pki, kind, tmp_path),)))
        with pytest.raises(WorkloadApiTimeoutError) as caught:
            TokenClient.from_spiffe("localhost:1", endpoint_socket=workload_agent.address, first_svid_timeout=1)
        assert f"(last seen: an update was not used: the X509-SVID {BFF_ID} has {problem}; {CLIENT_KEYS})" in str(
            caught.value
        )

    def test_update_refused(
        self,
        pki: Pki,
        tmp_path: Path,
        workload_agent: WorkloadAgent,
        shared_server: RunningServer,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """An Ed25519 SVID pushed after a good one: logged once as not used, and the SVID in use stays in use."""
        good = svid(pki, "ecdsa-p256", tmp_path)
        workload_agent.start(SvidSet((good,)))
        target = f"127.0.0.1:{shared_server.port}"
        with TokenClient.from_spiffe(target, endpoint_socket=workload_agent.address) as client:
            assert client.whoami().caller_id == BFF_ID
            workload_agent.set(SvidSet((svid(pki, "ed25519", tmp_path),)))
            refusal = f"has an Ed25519 key, which gRPC cannot present; {CLIENT_KEYS}"
            wait_for(lambda: refusal in caplog.text)
            assert client.whoami().caller_id == BFF_ID
            assert client._tls.current.cert_pem == good.pair.cert_pem
        lines = [r.getMessage() for r in caplog.records if refusal in r.getMessage()]
        assert len(lines) == 1
        assert f"the certificate in use stays ({BFF_ID}, serial {good.serial:x})" in lines[0]
