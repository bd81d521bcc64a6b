"""The config file: parsed, validated, and frozen, at start-up and at every reload.

Every error names the file and the key path (`callers[2].max_ttl`) and says
what would be right. `synctoken check-config`, start-up and reload all run
this same loader; the [twilio] table is read by config/twilio.py, the TLS files
are checked by tlsfiles.py, and [tls] source = "spiffe" is read by workloadapi.py.
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synctoken_server.audit.privacy import IdentityHasher
from synctoken_server.authn.callercert import CallerIdSource, is_dns_name, parse_spiffe_id, parse_trust_domain
from synctoken_server.authn.mesh import MeshListener
from synctoken_server.config import audit, health, limits, mesh, metrics, tlsfiles, tracing, twilio, workloadapi
from synctoken_server.config.reader import ConfigError, TomlReader
from synctoken_server.config.tlsfiles import ServerTlsFiles, ServerTlsMaterial, TlsFileError
from synctoken_server.config.workloadapi import WorkloadApiSettings
from synctoken_server.durations import format_duration
from synctoken_server.filestamps import Stamps, stamp
from synctoken_server.policy.limitbackend import RedisSettings
from synctoken_server.policy.patterns import IdentityPattern, PatternError
from synctoken_server.policy.rules import RESERVED_IDENTITY_CHARACTERS, CallerRule, Policy, is_service_sid
from synctoken_server.serveroptions import ServerTimeouts
from synctoken_server.tokens.minting import TwilioCredentials

_DEFAULT_TTL = "1h"
_MIN_EXPIRY_WARNING = 60
_MAX_EXPIRY_WARNING = 366 * 24 * 3600


@dataclass(frozen=True)
class Config:
    """Everything the server needs, validated."""

    listen: str
    tls: ServerTlsMaterial | None
    """The checked TLS files; None when they come from the Workload API instead (`workload_api`)."""
    caller_id_source: CallerIdSource
    trust_domains: frozenset[str]
    credentials: TwilioCredentials
    """The active API key: the one that signs."""
    policy: Policy
    inactive_api_keys: tuple[str, ...] = ()
    """SIDs of the other API keys listed: kept track of until their tokens have expired, never used to sign."""
    tls_expiry_warning: int | None = None
    """Warn when the server certificate has less than this many seconds left; None: a third of its lifetime."""
    timeouts: ServerTimeouts = field(default_factory=ServerTimeouts)
    metrics_listen: str | None = None
    """Where Prometheus scrapes (plain HTTP); None: no metrics listener."""
    audit_identity: IdentityHasher | None = None
    """Hashes identities for the audit log; None: they are written as they are."""
    mesh: MeshListener | None = None
    """The listener where x-forwarded-client-cert names the caller; None: mesh mode off."""
    health_listen: str | None = None
    """Where plaintext gRPC health (grpc.health.v1 only) is served for the kubelet's probes; None: not served."""
    warnings: tuple[str, ...] = ()
    """Things that work but should not be so (a private key readable by others); shown, never fatal."""
    files: Stamps = ()
    """The config file and every file it names, stamped before they were read: what a reload watches."""
    effective: tuple[tuple[str, object], ...] = ()
    """Every key path the loader read and the value that applies, defaults included (see TomlReader.effective)."""
    limits_backend: RedisSettings | None = None
    """The Redis holding the global rate limits; None: each process's own buckets, with its share of each limit."""
    limits_replicas: int = 1
    """How many replicas serve the same callers (`[limits] replicas`): each process's share divides by it too."""
    workload_api: WorkloadApiSettings | None = None
    """`[tls] source = "spiffe"`: the certificate and the client CAs from this agent; None: from the files."""
    tracing_protocol: str | None = None
    """Each RPC a span, exported over OTLP with this protocol (grpc or http/protobuf) as the OTEL_* environment
    variables configure it; None: tracing off, and no OpenTelemetry loaded."""


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and freeze the config file at `path`.

    A ConfigError carries the files read before it (`files`), so that a
    reloader can try again when one of them is fixed.
    """
    source = str(path)
    reader = TomlReader(source, path.parent, os.environ if environ is None else environ)
    reader.files[path] = stamp(path)
    try:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(source, "", f"not valid TOML: {exc}") from None
        return _parse(reader, data)
    except ConfigError as exc:
        exc.files = tuple(reader.files.items())
        raise


_SERVER_KEYS = frozenset(
    {"listen", "drain_delay", "grace", "handshake_timeout", "idle_timeout", "max_connection_age", "watch_interval"}
)
_TLS_KEYS = frozenset({"cert_file", "key_file", "client_ca_file", "expiry_warning", *workloadapi.KEYS})
# The [identity] table names the caller's identity source (how a client certificate names the
# calling service), not the end user's identity: its name is the config file's contract, kept
# for history. In the code it is the caller id source.
_IDENTITY_TABLE_KEYS = frozenset({"source", "trust_domains"})
_DEFAULTS_KEYS = frozenset({"default_ttl", "max_ttl"})
_CALLER_KEYS = frozenset(
    {
        "id",
        "sync_services",
        "default_sync_service",
        "identity_pattern",
        "allowed_identity_characters",
        "default_ttl",
        "max_ttl",
        *limits.CALLER_KEYS,
    }
)

SCHEMA: Mapping[str, frozenset[str]] = {
    "server": _SERVER_KEYS,
    "tls": _TLS_KEYS,
    "identity": _IDENTITY_TABLE_KEYS,
    "twilio": twilio.TABLE_KEYS,
    "twilio.api_keys[]": twilio.API_KEY_KEYS,
    "audit": audit.KEYS,
    "limits": limits.TABLE_KEYS,
    "limits.redis": limits.REDIS_KEYS,
    "mesh": mesh.KEYS,
    "metrics": metrics.KEYS,
    "health": health.KEYS,
    "tracing": tracing.KEYS,
    "defaults": _DEFAULTS_KEYS,
    "callers[]": _CALLER_KEYS,
}
"""Every table (`[]`: an array of tables) and the keys it may hold, top-level tables in the order the README
and check-config show them. The readers refuse any other key with these same sets, and tests hold check-config's
dump, the README's reference and the restart-only keys to them (tests/docs/test_readme.py)."""

_TABLES = tuple(table.removesuffix("[]") for table in SCHEMA if "." not in table)


def key_paths() -> tuple[str, ...]:
    """Every key the schema allows, as a path (`server.listen`, `callers[].max_ttl`); an array of tables by its keys."""
    return tuple(
        f"{table}.{key}"
        for table, keys in SCHEMA.items()
        for key in sorted(keys)
        if f"{table}.{key}[]" not in SCHEMA and f"{table}.{key}" not in SCHEMA
    )


def _parse(r: TomlReader, data: dict[str, Any]) -> Config:
    r.reject_unknown(data, "", set(_TABLES))
    for table in _TABLES:  # absent until read: check-config shows an optional table that is not there as null
        r.note(table, None)
    listen, timeouts = _server(r, data)
    tls, workload, expiry_warning = _tls(r, data)
    source, trust_domains = _caller_id_source(r, data)
    keys = twilio.read_twilio(r, data)
    defaults = r.table(data, "defaults", _DEFAULTS_KEYS, required=False)
    default_max = r.ttl(defaults, "defaults", "max_ttl", _DEFAULT_TTL)
    default_ttl = r.ttl(defaults, "defaults", "default_ttl", format_duration(default_max))
    if default_ttl > default_max:
        raise r.fail(
            "defaults.default_ttl",
            f"{format_duration(default_ttl)} is above defaults.max_ttl {format_duration(default_max)}",
        )
    callers = data.get("callers", [])
    r.note("callers", [])  # [[callers]] entries are filled in below, at callers[i]
    if not isinstance(callers, list) or not all(isinstance(c, dict) for c in callers):
        raise r.fail("callers", "must be an array of tables ([[callers]])")
    inherited = _CallerDefaults(source, trust_domains, default_ttl, default_max, limits.read_global_shadow(r, data))
    rules = [_caller(r, c, f"callers[{i}]", inherited) for i, c in enumerate(callers)]
    seen: dict[str, int] = {}
    for i, rule in enumerate(rules):
        if rule.caller in seen:
            raise r.fail(f"callers[{i}].id", f"{rule.caller} is already the id of callers[{seen[rule.caller]}]")
        seen[rule.caller] = i
    metrics_listen = metrics.read_listen(r, data)
    mesh_listener = mesh.read_mesh(r, data, source, listen)
    mesh_listen = mesh_listener.address if mesh_listener is not None else None
    others = {"server.listen": listen, "metrics.listen": metrics_listen, "mesh.listen": mesh_listen}
    return Config(
        listen=listen,
        tls=tls,
        workload_api=workload,
        caller_id_source=source,
        trust_domains=trust_domains,
        credentials=keys.credentials,
        policy=Policy(rules),
        inactive_api_keys=keys.inactive,
        tls_expiry_warning=expiry_warning,
        timeouts=timeouts,
        metrics_listen=metrics_listen,
        tracing_protocol=tracing.read_tracing(r, data),
        audit_identity=audit.read_audit(r, data),
        mesh=mesh_listener,
        limits_replicas=limits.read_replicas(r, data),
        limits_backend=limits.read_backend(r, data),
        health_listen=health.read_listen(r, data, others),
        warnings=tuple(r.warnings),
        files=tuple(r.files.items()),
        effective=tuple(r.effective.items()),
    )


def _server(r: TomlReader, data: Mapping[str, Any]) -> tuple[str, ServerTimeouts]:
    server = r.table(data, "server", _SERVER_KEYS)
    listen = r.listen(server, "server", "listen", "127.0.0.1:50051 or [::]:50051")
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
        watch_interval=r.duration(
            server, "server", "watch_interval", format_duration(default.watch_interval), 0, 10 * minute
        ),
    )
    return listen, timeouts


def _tls(
    r: TomlReader, data: Mapping[str, Any]
) -> tuple[ServerTlsMaterial | None, WorkloadApiSettings | None, int | None]:
    tls = r.table(data, "tls", _TLS_KEYS)
    workload = workloadapi.read_source(r, tls)
    material = None if workload is not None else _tls_files(r, tls)
    expiry_warning = None
    r.note("tls.expiry_warning", "a third of the certificate's lifetime")
    if "expiry_warning" in tls:
        expiry_warning = r.duration(tls, "tls", "expiry_warning", "", _MIN_EXPIRY_WARNING, _MAX_EXPIRY_WARNING)
    return material, workload, expiry_warning


def _tls_files(r: TomlReader, tls: Mapping[str, Any]) -> ServerTlsMaterial:
    cert, key, ca = (r.get(tls, "tls", name, str) for name in ("cert_file", "key_file", "client_ca_file"))
    cert_pem = r.read_file(tlsfiles.CERT_KEY, cert)
    key_pem = r.read_file(tlsfiles.KEY_KEY, key, private=True)
    ca_pem = r.read_file(tlsfiles.CA_KEY, ca)
    files = ServerTlsFiles(r.path(cert), r.path(key), r.path(ca))
    # Stamped by read_file just before it read each: a change since is seen by the certificate watcher.
    stamps = tuple((path, r.files[path]) for path in files.paths())
    try:
        material = tlsfiles.check(files, stamps, cert_pem, key_pem, ca_pem, now=dt.datetime.now(dt.UTC))
    except TlsFileError as exc:
        raise r.fail(exc.key, exc.problem) from None
    if not tlsfiles.grpc_can_serve(material):
        raise r.fail(tlsfiles.KEY_KEY, "gRPC refused this key and certificate; " + tlsfiles.SERVER_KEYS)
    return material


def _caller_id_source(r: TomlReader, data: Mapping[str, Any]) -> tuple[CallerIdSource, frozenset[str]]:
    """The `[identity]` table: which SAN names the caller, and (spiffe) the trusted trust domains."""
    table = r.table(data, "identity", _IDENTITY_TABLE_KEYS)
    text = r.get(table, "identity", "source", str, CallerIdSource.SPIFFE.value)
    try:
        source = CallerIdSource(text)
    except ValueError:
        choices = ", ".join(s.value for s in CallerIdSource)
        raise r.fail("identity.source", f"{text!r} is not one of {choices}") from None
    if source is not CallerIdSource.SPIFFE:
        if "trust_domains" in table:
            raise r.fail("identity.trust_domains", "only applies when identity.source is spiffe")
        return source, frozenset()
    domains = r.string_list(table, "identity", "trust_domains")
    if not domains:
        raise r.fail("identity.trust_domains", "must list at least one trust domain")
    for i, domain in enumerate(domains):
        try:
            parse_trust_domain(domain)
        except ValueError as exc:
            raise r.fail(f"identity.trust_domains[{i}]", str(exc)) from None
    return source, frozenset(domains)


@dataclass(frozen=True)
class _CallerDefaults:
    """What every caller entry is checked against, or inherits."""

    source: CallerIdSource
    trust_domains: frozenset[str]
    default_ttl: int
    max_ttl: int
    shadow: bool


def _caller(r: TomlReader, data: Mapping[str, Any], key: str, defaults: _CallerDefaults) -> CallerRule:
    r.reject_unknown(data, key, _CALLER_KEYS)
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
        limits=limits.read_caller_limits(r, data, key, shadow=defaults.shadow),
    )


def _check_caller_id(
    r: TomlReader, key: str, caller: str, source: CallerIdSource, trust_domains: frozenset[str]
) -> None:
    if source is CallerIdSource.DNS_SAN:
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
