"""Who the caller is, read from its verified TLS client certificate and nothing else."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from synctoken_server.errors import CallerUnauthenticated

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_DNS_NAME = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


class IdentitySource(enum.Enum):
    """Which part of the client certificate names the caller."""

    SPIFFE = "spiffe"
    DNS_SAN = "dns_san"


@dataclass(frozen=True)
class SpiffeId:
    """A parsed SPIFFE ID, spiffe://<trust domain>/<path>, per the SPIFFE ID standard."""

    trust_domain: str
    path: str

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse and validate; raise ValueError saying what is wrong."""
        scheme, sep, rest = text.partition("://")
        if scheme != "spiffe" or not sep:
            msg = f"{text!r} is not a SPIFFE ID: it must start with spiffe://"
            raise ValueError(msg)
        trust_domain, slash, path = rest.partition("/")
        if not _TRUST_DOMAIN.fullmatch(trust_domain):
            msg = f"{text!r} is not a SPIFFE ID: trust domain must be lower-case letters, digits, '.', '-' or '_'"
            raise ValueError(msg)
        if slash:
            for segment in path.split("/"):
                if segment in ("", ".", "..") or not _PATH_SEGMENT.fullmatch(segment):
                    msg = (
                        f"{text!r} is not a SPIFFE ID: path segment {segment!r} is empty, '.', '..' "
                        "or has a character outside A-Z a-z 0-9 . - _"
                    )
                    raise ValueError(msg)
        return cls(trust_domain=trust_domain, path=f"/{path}" if slash else "")

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


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
            spiffe_id = SpiffeId.parse(values[0].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CallerUnauthenticated("its SPIFFE ID is malformed") from exc
        if spiffe_id.trust_domain not in self.trust_domains:
            raise CallerUnauthenticated(f"trust domain {spiffe_id.trust_domain} is not trusted")
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
