"""`[audit]`: the identity hash key, read into `synctoken.audithash.IdentityHasher`; also for `synctoken audit-hash`."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from synctoken.audithash import MIN_KEY_BYTES, IdentityHasher, key_in_file
from synctoken_server.config.reader import ConfigError, TomlReader

KEYS = frozenset({"identity_hash_key_file"})
"""What [audit] may hold."""


def read_audit(r: TomlReader, data: Mapping[str, Any]) -> IdentityHasher | None:
    """`[audit] identity_hash_key_file`: the hasher for the audit log, or None (identities in plain text)."""
    table = r.table(data, "audit", KEYS, required=False)
    if "identity_hash_key_file" not in table:
        return None
    key = "audit.identity_hash_key_file"
    raw = r.read_file(key, r.get(table, "audit", "identity_hash_key_file", str), private=True, echo=False)
    return IdentityHasher(key_from_file(r, key, raw))


def key_from_file(r: TomlReader, key: str, raw: bytes) -> bytes:
    """The key in a key file's bytes, checked: at least MIN_KEY_BYTES."""
    secret = key_in_file(raw)
    if len(secret) < MIN_KEY_BYTES:
        raise r.fail(key, f"the key in the file it names is {len(secret)} bytes; use at least {MIN_KEY_BYTES}")
    return secret


def hasher_from_config(path: Path) -> IdentityHasher | None:
    """The hasher the config file at `path` sets up, reading only its [audit] table (no TLS files, no secrets).

    For `synctoken audit-hash`: the same reader, so the same value and the same error messages as the server.
    """
    reader = TomlReader(str(path), path.parent, os.environ)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None
    return read_audit(reader, data)


def hasher_from_key_file(path: Path) -> IdentityHasher:
    """The hasher for the key in the file at `path`, checked as the config loader checks it."""
    reader = TomlReader(str(path), Path.cwd(), os.environ)
    return IdentityHasher(key_from_file(reader, "", reader.read_file("", str(path), echo=False)))
