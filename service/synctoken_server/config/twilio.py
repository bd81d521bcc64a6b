"""The [twilio] table: the Account SID and the API keys, exactly one of them active for signing.

Two spellings load into the same thing. The list, for rotation:

    [[twilio.api_keys]]
    sid = "SK..."
    secret_file = "sk-new.secret"   # or secret_env = "NAME"
    active = true

and the single key of earlier versions (`api_key` with `api_secret_file` or
`api_secret_env`, or Twilio's TWILIO_API_KEY and TWILIO_API_SECRET
variables), which is a list of one, active. A file uses one or the other.
Secrets come from files or the environment, never from the config itself,
which is shared, printed and committed far more often; neither a secret
file's name nor a variable's name is ever echoed, in case a secret was
pasted there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from synctoken_server.config.reader import TomlReader
from synctoken_server.tokens.minting import TwilioCredentials, check_secret

ENV_ACCOUNT_SID = "TWILIO_ACCOUNT_SID"
ENV_API_KEY = "TWILIO_API_KEY"
ENV_API_SECRET = "TWILIO_API_SECRET"  # noqa: S105 - the variable's name, not its value

_ACCOUNT_SID = re.compile(r"AC[0-9a-f]{32}")
_API_KEY_SID = re.compile(r"SK[0-9a-f]{32}")
_SINGLE_KEY = ("api_key", "api_secret_file", "api_secret_env")
TABLE_KEYS = frozenset({"account_sid", "api_keys", *_SINGLE_KEY})
"""What [twilio] may hold, in either spelling."""
API_KEY_KEYS = frozenset({"sid", "secret_file", "secret_env", "active"})
"""What one [[twilio.api_keys]] entry may hold."""


@dataclass(frozen=True)
class TwilioKeys:
    """What signs (the active key) and which other keys the config lists (their SIDs; secrets are not kept)."""

    credentials: TwilioCredentials
    inactive: tuple[str, ...] = ()


def read_twilio(r: TomlReader, data: Mapping[str, Any]) -> TwilioKeys:
    """The [twilio] table, in either spelling."""
    twilio = r.table(data, "twilio", TABLE_KEYS, required=False)
    account_sid = _from_file_or_env(r, twilio, "account_sid", ENV_ACCOUNT_SID)
    if not _ACCOUNT_SID.fullmatch(account_sid):
        raise r.fail("twilio.account_sid", "must be AC followed by 32 lower-case hex digits")
    if "api_keys" in twilio:
        return _key_list(r, twilio, account_sid)
    api_key = _from_file_or_env(r, twilio, "api_key", ENV_API_KEY)
    _check_sid(r, "twilio.api_key", api_key)
    secret = _secret(r, twilio, "twilio", ("api_secret_file", "api_secret_env"), ENV_API_SECRET)
    return TwilioKeys(TwilioCredentials(account_sid=account_sid, api_key_sid=api_key, api_secret=secret))


def _key_list(r: TomlReader, twilio: Mapping[str, Any], account_sid: str) -> TwilioKeys:
    for name in _SINGLE_KEY:
        if name in twilio:
            raise r.fail(f"twilio.{name}", "set api_keys, or api_key with api_secret_file or api_secret_env; not both")
    entries = twilio["api_keys"]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise r.fail("twilio.api_keys", "must be an array of tables ([[twilio.api_keys]])")
    if not entries:
        raise r.fail("twilio.api_keys", "must list at least one key")
    active: tuple[int, TwilioCredentials] | None = None
    sids: dict[str, int] = {}
    for i, entry in enumerate(entries):
        key = f"twilio.api_keys[{i}]"
        r.reject_unknown(entry, key, API_KEY_KEYS)
        sid = r.get(entry, key, "sid", str)
        _check_sid(r, f"{key}.sid", sid)
        if sid in sids:
            raise r.fail(f"{key}.sid", f"{sid} is already the sid of twilio.api_keys[{sids[sid]}]")
        sids[sid] = i
        # Every listed key's secret is read, also an inactive one's: switching
        # to it must not be the moment its secret turns out to be missing.
        secret = _secret(r, entry, key, ("secret_file", "secret_env"), None)
        if r.get(entry, key, "active", bool, default=False):
            if active is not None:
                raise r.fail(f"{key}.active", f"twilio.api_keys[{active[0]}] is already active; exactly one key signs")
            active = (i, TwilioCredentials(account_sid=account_sid, api_key_sid=sid, api_secret=secret))
    if active is None:
        raise r.fail("twilio.api_keys", "no key has active = true; exactly one key signs")
    inactive = tuple(sid for sid in sids if sid != active[1].api_key_sid)
    return TwilioKeys(active[1], inactive)


def _check_sid(r: TomlReader, key: str, sid: str) -> None:
    if not _API_KEY_SID.fullmatch(sid):
        raise r.fail(key, "must be an API key SID: SK followed by 32 lower-case hex digits")


def _from_file_or_env(r: TomlReader, twilio: Mapping[str, Any], name: str, env: str) -> str:
    if name in twilio:
        return r.get(twilio, "twilio", name, str)
    value = r.environ.get(env, "")
    if not value:
        raise r.fail(f"twilio.{name}", f"missing, and the environment variable {env} is not set")
    r.note(f"twilio.{name}", value)  # a SID, not a secret
    return value


def _secret(r: TomlReader, table: Mapping[str, Any], key: str, names: tuple[str, str], default_env: str | None) -> str:
    """The secret named by `table`'s file key or variable key (`names`); `default_env` when neither is set."""
    file_name, env_name = names
    if file_name in table and env_name in table:
        raise r.fail(f"{key}.{file_name}", f"set {file_name} or {env_name}, not both")
    if file_name in table:
        path = f"{key}.{file_name}"
        raw = r.read_file(path, r.get(table, key, file_name, str), private=True, echo=False)
        try:
            secret = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise r.fail(path, "the secret file is not UTF-8 text") from None
    else:
        if env_name not in table and default_env is None:
            raise r.fail(key, f"set {file_name} or {env_name}: where this key's secret is")
        env = r.get(table, key, env_name, str, default_env)  # the variable's name, never its value
        path = f"{key}.{env_name}"
        secret = r.environ.get(env, "").strip()
        if not secret:
            named = env if env == default_env else "it names"
            raise r.fail(path, f"the environment variable {named} is not set or empty")
    if not secret or any(c.isspace() for c in secret):
        raise r.fail(path, "the API key secret must be non-empty and contain no whitespace")
    # PyJWT would refuse it on every token; refusing it here says so before serving.
    problem = check_secret(secret)
    if problem is not None:
        raise r.fail(path, f"the API key secret cannot sign HS256 tokens: {problem}")
    return secret
