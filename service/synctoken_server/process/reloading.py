"""Reloading a running server's config: on SIGHUP, and when the config file or a file it names changes.

A reload runs the start-up loader on the file (in a thread, so that reading
files and compiling patterns does not hold up RPCs). A bad file changes
nothing: the running snapshot stays and `config.reload_failed` names the
file, the key and the problem. A good one replaces the whole snapshot at
once (see rpc/snapshot.py).

Files are polled, one stat each every `server.watch_interval` (1 s by
default; 0 turns it off, for deployments that change several files and then
send SIGHUP): no new dependency, and it works alike on every filesystem,
Kubernetes secret volumes included. The TLS files are the certificate
watcher's (certificates.py): a change to them alone calls for a config reload
only to retry one that failed, perhaps because it read a certificate and key
caught mid-rotation.

Only a restart can change two things:
- the keys `restart_only` (below) lists: they belong to the listening
  sockets and gRPC's server. A reload that changes them applies everything
  else and logs `config.restart_required` per key: the rest does not depend
  on them, and holding back a policy fix because the port also changed would
  help no one.
- `identity.source`: callers' ids are written in that source's grammar, so
  a policy for the new source means nothing under the old one (it would deny
  every caller). Such a reload is refused as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path

import structlog

from synctoken_server.config.limits import REDIS_KEYS
from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import Config, load_config
from synctoken_server.durations import MAX_TTL_SECONDS, format_duration, format_milliseconds, format_utc
from synctoken_server.filestamps import changed
from synctoken_server.metrics import RELOAD_FAILURE, RELOAD_SUCCESS
from synctoken_server.policy.limitbackend import RedisSettings
from synctoken_server.process.server import TokenServer

CERTIFICATE_CHECK_SECONDS = 60.0
"""With file watching off, how often the certificate's files and expiry are still looked at."""

TRIGGER_SIGNAL = "SIGHUP"
TRIGGER_FILE = "file"

_log = structlog.get_logger("synctoken.reload")


class ConfigReloader:
    """Watches one server's config file and the files it names, and reloads on change or request."""

    def __init__(
        self, path: Path, server: TokenServer, config: Config, environ: Mapping[str, str] | None = None
    ) -> None:
        self._path = path
        self._server = server
        self._environ = environ
        self._in_force = restart_only(config)
        """What only a restart changes, as the server runs it."""
        self._files = config.files
        self._failed = False
        self._requested = asyncio.Event()
        self._lock = asyncio.Lock()

    def request(self) -> None:
        """Reload as soon as possible, whatever the files say (SIGHUP); the TLS files are re-read too."""
        self._requested.set()

    async def run(self) -> None:
        """Poll the files and serve requests until cancelled."""
        while True:
            interval = self._server.snapshots.current.config.timeouts.watch_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._requested.wait(), interval or CERTIFICATE_CHECK_SECONDS)
            try:
                await self._poll(watching=interval > 0)
            except Exception:  # noqa: BLE001 - a bug here must not end reloading for the server's lifetime
                _log.exception("reload.poll_failed")

    async def _poll(self, *, watching: bool) -> None:
        if self._requested.is_set():
            self._requested.clear()
            await self.reload(TRIGGER_SIGNAL)
            await asyncio.to_thread(self._server.certificates.refresh, force=True)
        elif watching and self._due():
            await self.reload(TRIGGER_FILE)
        # Also without connections to prompt gRPC's fetcher, a new certificate
        # is picked up (and logged) promptly, and an ageing one is warned about.
        await asyncio.to_thread(self._tick_certificates)

    async def reload(self, trigger: str) -> bool:
        """Load the file and, if it is good, serve it; return whether it was."""
        async with self._lock:
            try:
                config = await asyncio.to_thread(load_config, self._path, self._environ)
            except ConfigError as exc:
                self._server.metrics.reloads.labels(RELOAD_FAILURE).inc()
                self._files, self._failed = exc.files or self._files, True
                _log.error("config.reload_failed", trigger=trigger, file=exc.source, key=exc.key, problem=exc.problem)
                return False
            self._files = config.files
            current = self._server.snapshots.current.config
            if config.caller_id_source is not current.caller_id_source:
                self._server.metrics.reloads.labels(RELOAD_FAILURE).inc()
                self._failed = True
                _log.error(
                    "config.reload_failed",
                    trigger=trigger,
                    file=str(self._path),
                    key="identity.source",
                    problem=f"changed from {current.caller_id_source.value} to {config.caller_id_source.value}, "
                    "which needs a restart: the callers' ids are written for one source; nothing was reloaded",
                )
                return False
            self._failed = False
            old = self._server.apply(config)
            self._server.metrics.reloads.labels(RELOAD_SUCCESS).inc()
        for warning in config.warnings:
            _log.warning("config.warning", problem=warning)
        for key, value in restart_only(config).items():
            if value != self._in_force[key]:
                _log.warning("config.restart_required", key=key, running=self._in_force[key], configured=value)
        _log.info(
            "config.reloaded", trigger=trigger, callers=len(config.policy), api_key=config.credentials.api_key_sid
        )
        self._log_key_rotation(old.config, config)
        return True

    def _due(self) -> bool:
        moved = changed(self._files)
        if not moved:
            return False
        files = self._server.certificates.current.files
        return self._failed or files is None or not moved <= set(files.paths())

    def _tick_certificates(self) -> None:
        self._server.certificates.refresh()
        self._server.certificates.check_expiry()
        self._server.record_certificate()

    def _log_key_rotation(self, old: Config, new: Config) -> None:
        previous = old.credentials.api_key_sid
        if previous == new.credentials.api_key_sid:
            return
        signed = self._server.signed
        latest = signed.latest(previous)
        # Tokens from before this process started are unknown: bounded by the longest TTL either config allows.
        max_ttl = max(old.policy.longest_ttl, new.policy.longest_ttl) or MAX_TTL_SECONDS
        live_until = signed.live_until(previous, max_ttl)
        _log.info(
            "twilio.key_rotated",
            previous_key=previous,
            active_key=new.credentials.api_key_sid,
            previous_key_last_expiry=format_utc(latest) if latest is not None else None,
            previous_key_tokens_live_until=format_utc(live_until),
            unknown_before=format_utc(signed.started_at),
        )


def restart_only(config: Config) -> dict[str, str]:
    """The keys only a restart changes, as `config` sets them: the one list of them in the code.

    tests/docs/test_readme.py holds these keys to the schema (config.schema.SCHEMA) and to the README's lists.
    """
    group = config.mesh.socket_group if config.mesh else None
    redis = config.limits_backend
    workload = config.workload_api
    return {
        "server.listen": config.listen,
        # The Workload API's stream is opened once, before the port is bound (process/workloadcerts.py).
        "tls.source": "spiffe" if workload else "files",
        "tls.endpoint_socket": workload.endpoint_socket if workload else "(unused)",
        "tls.first_svid_timeout": format_duration(workload.first_svid_timeout) if workload else "(unused)",
        "server.handshake_timeout": format_duration(config.timeouts.handshake),
        "server.idle_timeout": format_duration(config.timeouts.idle),
        "server.max_connection_age": format_duration(config.timeouts.connection_age),
        "metrics.listen": config.metrics_listen or "(off)",
        # The interceptor and the exporter are made with the server.
        "tracing.enabled": "true" if config.tracing_protocol else "false",
        "mesh.listen": config.mesh.address if config.mesh else "(off)",
        "mesh.socket_group": "(none)" if group is None else str(group),  # set when the socket is made
        "health.listen": config.health_listen or "(off)",
        # The Redis client and its breaker are made once, at start.
        "limits.backend": "redis" if redis else "local",
        **_redis_restart_only(redis),
    }


def _redis_restart_only(redis: RedisSettings | None) -> dict[str, str]:
    if redis is None:  # local buckets: the Redis keys are not in use
        keys = ("limits.on_backend_failure", *(f"limits.redis.{key}" for key in sorted(REDIS_KEYS)))
        return dict.fromkeys(keys, "(unused)")
    files = {
        "password_file": redis.password_file,
        "ca_file": redis.ca_file,
        "cert_file": redis.cert_file,
        "key_file": redis.key_file,
    }
    return {
        "limits.on_backend_failure": redis.on_failure.value,
        "limits.redis.url": redis.url,
        # The file's name: a new password in the same file is read at the restart too.
        **{f"limits.redis.{name}": str(path) if path else "(none)" for name, path in files.items()},
        "limits.redis.timeout": format_milliseconds(redis.timeout_ms),
        "limits.redis.batch_window": format_milliseconds(redis.batch_window_ms),
        "limits.redis.breaker_failures": str(redis.breaker_failures),
        "limits.redis.breaker_cooldown": format_milliseconds(redis.breaker_cooldown_ms),
        "limits.redis.key_prefix": redis.key_prefix,
    }
