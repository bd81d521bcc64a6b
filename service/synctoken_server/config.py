"""The config file: parsed once at start-up, validated, and frozen.

Every error names the file and the key path (`callers[2].max_ttl`) and says
what would be right. `synctoken check-config` runs this same loader.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import PublicKeyAlgorithmOID

from synctoken_server.configfile import ConfigError, TomlReader
from synctoken_server.durations import format_duration
from synctoken_server.identity import IdentitySource, is_dns_name, parse_spiffe_id, parse_trust_domain
from synctoken_server.minting import TwilioCredentials
from synctoken_server.patterns import IdentityPattern, PatternError
from synctoken_server.policy import RESERVED_IDENTITY_CHARACTERS, CallerRule, Policy, is_service_sid

ENV_ACCOUNT_SID = "TWILIO_ACCOUNT_SID"
ENV_API_KEY = "TWILIO_API_KEY"
ENV_API_SECRET = "TWILIO_API_SECRET"  # noqa: S105 - the variable's name, not its value

_ACCOUNT_SID = re.compile(r"AC[0-9a-f]{32}")
_API_KEY_SID = re.compile(r"SK[0-9a-f]{32}")
# [0-9], not \d: \d also matches other scripts' digits, such as U+FF15 (a full-width 5).
_LISTEN = re.compile(r"(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")
_DEFAULT_TTL = "1h"
_MAX_PORT = 65535
_MIN_RSA_BITS = 2048
# What gRPC's TLS (BoringSSL) can serve with, found by trying: P-521 and
# Ed25519 keys load but every handshake fails; Ed448, DSA, P-224 and
# secp256k1 keys make the port fail to bind.
_SERVER_CURVES = frozenset({"secp256r1", "secp384r1"})
_SERVER_KEYS = "gRPC serves RSA (2048 bits or more) and ECDSA P-256 or P-384 keys"


@dataclass(frozen=True)
class TlsMaterial:
    """The server's certificate chain and key, and the CA that client certificates must chain to."""

    cert_chain_pem: bytes = field(repr=False)
    private_key_pem: bytes = field(repr=False)
    client_ca_pem: bytes = field(repr=False)


@dataclass(frozen=True)
class ServerTimeouts:
    """How long connections may take, and how a stop drains; all in seconds."""

    drain_delay: int = 5
    """After SIGTERM: health says NOT_SERVING, but calls are still accepted this long, so balancers notice."""
    grace: int = 10
    """Then: no new calls; calls in flight get this long to finish."""
    handshake: int = 10
    """A connection that has not finished its TLS handshake by then is closed."""
    idle: int = 300
    """A connection with no call for this long is closed (clients reconnect when they need to)."""
    connection_age: int = 600
    """Any connection is asked to go away (GOAWAY) after this long, and closed `grace` later even if a
    call on it is still unfinished: a peer cannot hold a connection open with a request it never completes."""


@dataclass(frozen=True)
class Config:
    """Everything the server needs, validated."""

    listen: str
    tls: TlsMaterial
    identity_source: IdentitySource
    trust_domains: frozenset[str]
    credentials: TwilioCredentials
    policy: Policy
    timeouts: ServerTimeouts = ServerTimeouts()
    warnings: tuple[str, ...] = ()
    """Things that work but should not be so (a private key readable by others); shown, never fatal."""


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and freeze the config file at `path`."""
    source = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None
    reader = TomlReader(source, path.parent, os.environ if environ is None else environ)
    return _parse(reader, data)


def _parse(r: TomlReader, data: dict[str, Any]) -> Config:
    r.reject_unknown(data, "", {"server", "tls", "identity", "twilio", "defaults", "callers"})
    listen, timeouts = _server(r, data)
    tls = _tls(r, data)
    source, trust_domains = _identity(r, data)
    credentials = _twilio(r, data)
    defaults = r.table(data, "defaults", {"default_ttl", "max_ttl"}, required=False)
    default_max = r.ttl(defaults, "defaults", "max_ttl", _DEFAULT_TTL)
    default_ttl = r.ttl(defaults, "defaults", "default_ttl", format_duration(default_max))
    if default_ttl > default_max:
        raise r.fail(
            "defaults.default_ttl",
            f"{format_duration(default_ttl)} is above defaults.max_ttl {format_duration(default_max)}",
        )
    callers = data.get("callers", [])
    if not isinstance(callers, list) or not all(isinstance(c, dict) for c in callers):
        raise r.fail("callers", "must be an array of tables ([[callers]])")
    inherited = _CallerDefaults(source, trust_domains, default_ttl, default_max)
    rules = [_caller(r, c, f"callers[{i}]", inherited) for i, c in enumerate(callers)]
    seen: dict[str, int] = {}
    for i, rule in enumerate(rules):
        if rule.caller in seen:
            raise r.fail(f"callers[{i}].id", f"{rule.caller} is already the id of callers[{seen[rule.caller]}]")
        seen[rule.caller] = i
    return Config(
        listen=listen,
        tls=tls,
        identity_source=source,
        trust_domains=trust_domains,
        credentials=credentials,
        policy=Policy(rules),
        timeouts=timeouts,
        warnings=tuple(r.warnings),
    )


def _server(r: TomlReader, data: Mapping[str, Any]) -> tuple[str, ServerTimeouts]:
    server = r.table(
        data, "server", {"listen", "drain_delay", "grace", "handshake_timeout", "idle_timeout", "max_connection_age"}
    )
    listen = r.get(server, "server", "listen", str)
    match = _LISTEN.fullmatch(listen)
    if match is None or not 0 <= int(match["port"]) <= _MAX_PORT:
        raise r.fail("server.listen", f"{listen!r} is not host:port (e.g. 127.0.0.1:50051 or [::]:50051)")
    default = ServerTimeouts()
    minute, hour = 60, 3600
    timeouts = ServerTimeouts(
        drain_delay=r.duration(server, "server", "drain_delay", format_duration(default.drain_delay), 0, 10 * minute),
        grace=r.duration(server, "server", "grace", format_duration(default.grace), 0, 10 * minute),
        handshake=r.duration(server, "server", "handshake_timeout", format_duration(default.handshake), 1, minute),
        idle=r.duration(server, "server", "idle_timeout", format_duration(default.idle), 10, 24 * hour),
        connection_age=r.duration(
            server, "server", "max_connection_age", format_duration(default.connection_age), 1, 24 * hour
        ),
    )
    return listen, timeouts


def _tls(r: TomlReader, data: Mapping[str, Any]) -> TlsMaterial:
    tls = r.table(data, "tls", {"cert_file", "key_file", "client_ca_file"})
    cert_pem = r.read_file("tls.cert_file", r.get(tls, "tls", "cert_file", str))
    key_pem = r.read_file("tls.key_file", r.get(tls, "tls", "key_file", str), private=True)
    ca_pem = r.read_file("tls.client_ca_file", r.get(tls, "tls", "client_ca_file", str))
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise r.fail("tls.cert_file", "is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except UnsupportedAlgorithm:
        raise r.fail("tls.key_file", f"is a kind of key that cannot be used; {_SERVER_KEYS}") from None
    except (ValueError, TypeError):
        raise r.fail("tls.key_file", "is not an unencrypted PEM private key") from None
    unusable = _unusable_server_key(key, chain[0])
    if unusable:
        raise r.fail("tls.key_file", f"{unusable}; {_SERVER_KEYS}")
    if key.public_key() != chain[0].public_key():
        raise r.fail("tls.key_file", "does not match the first certificate in tls.cert_file")
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise r.fail("tls.client_ca_file", "is not a PEM certificate") from None
    return TlsMaterial(cert_chain_pem=cert_pem, private_key_pem=key_pem, client_ca_pem=ca_pem)


def _unusable_server_key(key: object, certificate: x509.Certificate) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        # An RSA-PSS key loads as an RSA key, but BoringSSL will not serve with it.
        if certificate.public_key_algorithm_oid == PublicKeyAlgorithmOID.RSASSA_PSS:
            return "an RSA-PSS key cannot be used"
        return "" if key.key_size >= _MIN_RSA_BITS else f"a {key.key_size}-bit RSA key is too weak"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "" if key.curve.name in _SERVER_CURVES else f"an ECDSA key on curve {key.curve.name} cannot be used"
    kind = type(key).__name__.removeprefix("_").removesuffix("PrivateKey")
    return f"an {kind} key cannot be used" if kind[:1] in "AEIOU" else f"a {kind} key cannot be used"


def _identity(r: TomlReader, data: Mapping[str, Any]) -> tuple[IdentitySource, frozenset[str]]:
    identity = r.table(data, "identity", {"source", "trust_domains"})
    text = r.get(identity, "identity", "source", str, IdentitySource.SPIFFE.value)
    try:
        source = IdentitySource(text)
    except ValueError:
        choices = ", ".join(s.value for s in IdentitySource)
        raise r.fail("identity.source", f"{text!r} is not one of {choices}") from None
    if source is not IdentitySource.SPIFFE:
        if "trust_domains" in identity:
            raise r.fail("identity.trust_domains", "only applies when identity.source is spiffe")
        return source, frozenset()
    domains = r.string_list(identity, "identity", "trust_domains")
    if not domains:
        raise r.fail("identity.trust_domains", "must list at least one trust domain")
    for i, domain in enumerate(domains):
        try:
            parse_trust_domain(domain)
        except ValueError as exc:
            raise r.fail(f"identity.trust_domains[{i}]", str(exc)) from None
    return source, frozenset(domains)


def _twilio(r: TomlReader, data: Mapping[str, Any]) -> TwilioCredentials:
    twilio = r.table(data, "twilio", {"account_sid", "api_key", "api_secret_file", "api_secret_env"}, required=False)
    account_sid = _from_file_or_env(r, twilio, "account_sid", ENV_ACCOUNT_SID)
    if not _ACCOUNT_SID.fullmatch(account_sid):
        raise r.fail("twilio.account_sid", "must be AC followed by 32 lower-case hex digits")
    api_key = _from_file_or_env(r, twilio, "api_key", ENV_API_KEY)
    if not _API_KEY_SID.fullmatch(api_key):
        raise r.fail("twilio.api_key", "must be an API key SID: SK followed by 32 lower-case hex digits")
    return TwilioCredentials(account_sid=account_sid, api_key_sid=api_key, api_secret=_secret(r, twilio))


def _from_file_or_env(r: TomlReader, twilio: Mapping[str, Any], name: str, env: str) -> str:
    if name in twilio:
        return r.get(twilio, "twilio", name, str)
    value = r.environ.get(env, "")
    if not value:
        raise r.fail(f"twilio.{name}", f"missing, and the environment variable {env} is not set")
    return value


def _secret(r: TomlReader, twilio: Mapping[str, Any]) -> str:
    # The secret may come from a file or an environment variable but never from
    # the config itself, which is shared, printed and committed far more often.
    if "api_secret_file" in twilio and "api_secret_env" in twilio:
        raise r.fail("twilio.api_secret_file", "set api_secret_file or api_secret_env, not both")
    # Neither value is ever echoed: a secret pasted into either key would be printed back.
    if "api_secret_file" in twilio:
        key = "twilio.api_secret_file"
        raw = r.read_file(key, r.get(twilio, "twilio", "api_secret_file", str), private=True, echo=False)
        try:
            secret = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise r.fail(key, "the secret file is not UTF-8 text") from None
    else:
        env = r.get(twilio, "twilio", "api_secret_env", str, ENV_API_SECRET)
        key = "twilio.api_secret_env"
        secret = r.environ.get(env, "").strip()
        if not secret:
            named = ENV_API_SECRET if env == ENV_API_SECRET else "it names"
            raise r.fail(key, f"the environment variable {named} is not set or empty")
    if not secret or any(c.isspace() for c in secret):
        raise r.fail(key, "the API key secret must be non-empty and contain no whitespace")
    return secret


@dataclass(frozen=True)
class _CallerDefaults:
    """What every caller entry is checked against, or inherits."""

    source: IdentitySource
    trust_domains: frozenset[str]
    default_ttl: int
    max_ttl: int


def _caller(r: TomlReader, data: Mapping[str, Any], key: str, defaults: _CallerDefaults) -> CallerRule:
    allowed = {
        "id",
        "sync_services",
        "default_sync_service",
        "identity_pattern",
        "allowed_identity_characters",
        "default_ttl",
        "max_ttl",
    }
    r.reject_unknown(data, key, allowed)
    caller = r.get(data, key, "id", str)
    _check_caller_id(r, f"{key}.id", caller, defaults.source, defaults.trust_domains)
    services = r.string_list(data, key, "sync_services")
    if not services:
        raise r.fail(f"{key}.sync_services", "must list at least one Sync service SID")
    for i, sid in enumerate(services):
        if not is_service_sid(sid):
            raise r.fail(
                f"{key}.sync_services[{i}]", f"{sid!r} is not a Sync service SID (IS + 32 lower-case hex digits)"
            )
    default_service = r.get(data, key, "default_sync_service", str, "") or None
    if default_service is not None and default_service not in services:
        raise r.fail(f"{key}.default_sync_service", f"{default_service} is not in {key}.sync_services")
    pattern = _identity_pattern(r, data, key)
    chars = r.get(data, key, "allowed_identity_characters", str, "")
    outside = sorted(set(chars) - set(RESERVED_IDENTITY_CHARACTERS))
    if outside:
        raise r.fail(
            f"{key}.allowed_identity_characters",
            f"{''.join(outside)!r} are not reserved characters; only {RESERVED_IDENTITY_CHARACTERS!r} need allowing",
        )
    max_ttl = r.ttl(data, key, "max_ttl", format_duration(defaults.max_ttl))
    ttl = r.ttl(data, key, "default_ttl", format_duration(min(defaults.default_ttl, max_ttl)))
    if ttl > max_ttl:
        raise r.fail(f"{key}.default_ttl", f"{format_duration(ttl)} is above {key}.max_ttl {format_duration(max_ttl)}")
    return CallerRule(
        caller=caller,
        sync_services=services,
        default_sync_service=default_service,
        identity_pattern=pattern,
        allowed_identity_characters=frozenset(chars),
        default_ttl=ttl,
        max_ttl=max_ttl,
    )


def _check_caller_id(
    r: TomlReader, key: str, caller: str, source: IdentitySource, trust_domains: frozenset[str]
) -> None:
    if source is IdentitySource.DNS_SAN:
        if not is_dns_name(caller):
            raise r.fail(key, f"{caller!r} is not a lower-case DNS name (identity.source is dns_san)")
        return
    text = caller.removesuffix("/*")
    try:
        spiffe_id = parse_spiffe_id(text)
    except ValueError as exc:
        raise r.fail(key, f"{exc}; a prefix ends in /*") from None
    # A certificate naming a bare trust domain is refused (it is no workload),
    # so such an id would match nobody; spiffe://td/* is every workload in td.
    if not spiffe_id.path and text == caller:
        raise r.fail(
            key, f"{caller!r} is a trust domain, not a workload: add a path, or write {caller}/* for all its workloads"
        )
    if spiffe_id.trust_domain.name not in trust_domains:
        raise r.fail(key, f"trust domain {spiffe_id.trust_domain.name} is not in identity.trust_domains")


def _identity_pattern(r: TomlReader, data: Mapping[str, Any], key: str) -> IdentityPattern | None:
    text = r.get(data, key, "identity_pattern", str, "")
    if not text:
        return None
    try:
        return IdentityPattern.compile(text)
    except PatternError as exc:
        raise r.fail(f"{key}.identity_pattern", str(exc)) from None
