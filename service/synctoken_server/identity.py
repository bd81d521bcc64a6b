"""Who the caller is, read from its verified TLS client certificate and nothing else."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from spiffe import SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

from synctoken_server.errors import CallerUnauthenticated

SPIFFE_ID_FORM = (
    "spiffe://<trust domain>/<path>, the trust domain in a-z 0-9 . - _, "
    "path segments in A-Z a-z 0-9 . - _ and none empty, '.' or '..'"
)
TRUST_DOMAIN_FORM = "a-z 0-9 . - _ only, with no scheme, port or path"

_DNS_NAME = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


class IdentitySource(enum.Enum):
    """Which part of the client certificate names the caller."""

    SPIFFE = "spiffe"
    DNS_SAN = "dns_san"


def parse_spiffe_id(text: str) -> SpiffeId:
    """The SPIFFE ID `text` is, if it is one written canonically; else ValueError.

    The trust domain ID (no path) passes: callers of this decide whether they
    need a workload.
    """
    try:
        spiffe_id = SpiffeId(text)
    except PySpiffeError:
        raise ValueError(f"{text!r} is not a SPIFFE ID ({SPIFFE_ID_FORM})") from None
    # The spiffe package lower-cases the scheme and trust domain it reads, and
    # its character checks end in `$`, which also matches before a final
    # newline: only an id that prints back exactly, newline-free, is valid.
    if str(spiffe_id) != text or "\n" in text:
        raise ValueError(f"{text!r} is not a SPIFFE ID ({SPIFFE_ID_FORM})")
    return spiffe_id


def parse_trust_domain(text: str) -> TrustDomain:
    """The trust domain named by `text`, if it is a bare lower-case trust domain name; else ValueError."""
    try:
        trust_domain = TrustDomain(text)
    except PySpiffeError:
        raise ValueError(f"{text!r} is not a trust domain name ({TRUST_DOMAIN_FORM})") from None
    # TrustDomain also takes "TD" (as td) and a whole SPIFFE ID (as its trust
    # domain); neither is what a config entry should say.
    if trust_domain.name != text or "\n" in text:
        raise ValueError(f"{text!r} is not a trust domain name ({TRUST_DOMAIN_FORM})")
    return trust_domain


def is_dns_name(text: str) -> bool:
    """True for a lower-case DNS host name such as billing.internal.example.com."""
    return _DNS_NAME.fullmatch(text) is not None


@dataclass(frozen=True)
class CallerIdentityRules:
    """How to turn a verified client certificate into a caller id."""

    source: IdentitySource
    trust_domains: frozenset[str]

    def caller_id(self, auth_context: Mapping[str, Sequence[bytes]]) -> str:
        """The caller id of a TLS peer; raise CallerUnauthenticated if it has none we accept.

        `auth_context` is grpc's view of the verified peer certificate. gRPC
        sets "peer_spiffe_id" only when the certificate has exactly one URI
        SAN and it is a SPIFFE ID, so a certificate naming two workloads is
        refused rather than guessed at.
        """
        if self.source is IdentitySource.SPIFFE:
            return self._spiffe_caller(auth_context)
        return self._dns_caller(auth_context)

    def _spiffe_caller(self, auth_context: Mapping[str, Sequence[bytes]]) -> str:
        values = auth_context.get("peer_spiffe_id", ())
        if len(values) != 1:
            raise CallerUnauthenticated("it must have exactly one URI SAN, a SPIFFE ID")
        try:
            spiffe_id = parse_spiffe_id(values[0].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CallerUnauthenticated("its SPIFFE ID is malformed") from exc
        if spiffe_id.trust_domain.name not in self.trust_domains:
            raise CallerUnauthenticated(f"trust domain {spiffe_id.trust_domain.name} is not trusted")
        return str(spiffe_id)

    @staticmethod
    def _dns_caller(auth_context: Mapping[str, Sequence[bytes]]) -> str:
        values = auth_context.get("peer_dns", ())
        if len(values) != 1:
            raise CallerUnauthenticated("it must have exactly one DNS SAN")
        name = values[0].decode("ascii", errors="replace")
        if not is_dns_name(name):
            raise CallerUnauthenticated("its DNS SAN is not a lower-case host name")
        return name
