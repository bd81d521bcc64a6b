"""Twilio API keys: the [[twilio.api_keys]] list, switching the active key live, and telling when the old one may go."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import jwt
import pytest

from support.calls import SteadyLoad
from support.configs import WriteConfig, config_text
from support.constants import API_KEY_SID
from support.files import replace_file
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import Process, check_config, free_port, serve
from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import load_config
from synctoken_server.tokens.keyledger import SignedExpiries

KEY_A = "SK" + "a" * 32
KEY_B = "SK" + "b" * 32
SECRETS = {KEY_A: "s3cr3t-of-key-a-" + "1" * 16, KEY_B: "s3cr3t-of-key-b-" + "2" * 16}
SINGLE_KEY = f'api_key = "{API_KEY_SID}"\n'


def key_list(active: str, *, listed: tuple[str, ...] = (KEY_A, KEY_B)) -> str:
    """[[twilio.api_keys]] entries for `listed`, secrets in files named after them, `active` active."""
    return "".join(
        f'[[twilio.api_keys]]\nsid = "{sid}"\nsecret_file = "{sid}.secret"\n'
        + ("active = true\n" if sid == active else "")
        for sid in listed
    )


def with_keys(pki: Pki, keys: str, *, listen: str = "127.0.0.1:0") -> str:
    """The suite's config with `keys` in place of its single api_key."""
    text = config_text(pki, listen=listen)
    assert SINGLE_KEY in text
    return text.replace(SINGLE_KEY, keys)


@pytest.fixture
def secret_files(tmp_path: Path, leak_watch: LeakWatch) -> None:
    """Both keys' secrets, in files beside the config, owner-only."""
    for sid, secret in SECRETS.items():
        (tmp_path / f"{sid}.secret").write_text(secret + "\n", encoding="utf-8")
        (tmp_path / f"{sid}.secret").chmod(0o600)
        leak_watch.secrets.add(secret)


@pytest.mark.usefixtures("secret_files")
class TestKeyList:
    """The list loads into one active key and the SIDs of the others."""

    def test_loads(self, pki: Pki, write_config: WriteConfig) -> None:
        """The active key signs; the other is listed, its secret checked but not kept."""
        config = load_config(write_config(with_keys(pki, key_list(KEY_B))), environ={})
        assert (config.credentials.api_key_sid, config.credentials.api_secret) == (KEY_B, SECRETS[KEY_B])
        assert config.inactive_api_keys == (KEY_A,)

    def test_secret_from_variable(self, pki: Pki, write_config: WriteConfig) -> None:
        """secret_env names the variable holding a key's secret."""
        keys = f'[[twilio.api_keys]]\nsid = "{KEY_A}"\nsecret_env = "KEY_A_SECRET"\nactive = true\n'
        config = load_config(write_config(with_keys(pki, keys)), environ={"KEY_A_SECRET": SECRETS[KEY_A]})
        assert config.credentials.api_secret == SECRETS[KEY_A]

    @pytest.mark.parametrize(
        ("keys", "message"),
        [
            (
                SINGLE_KEY + key_list(KEY_A),
                "twilio.api_key: set api_keys, or api_key with api_secret_file or api_secret_env; not both",
            ),
            ("api_keys = []\n", "twilio.api_keys: must list at least one key"),
            ('api_keys = "SK"\n', "twilio.api_keys: must be an array of tables ([[twilio.api_keys]])"),
            (key_list(""), "twilio.api_keys: no key has active = true; exactly one key signs"),
            (
                key_list(KEY_A) + "active = true\n",
                "twilio.api_keys[1].active: twilio.api_keys[0] is already active; exactly one key signs",
            ),
            (
                key_list(KEY_A, listed=(KEY_A, KEY_A)),
                f"twilio.api_keys[1].sid: {KEY_A} is already the sid of twilio.api_keys[0]",
            ),
            (
                key_list("SKnope", listed=("SKnope",)),
                "twilio.api_keys[0].sid: must be an API key SID: SK followed by 32 lower-case hex digits",
            ),
            (
                key_list(KEY_A, listed=(KEY_A,)) + f'[[twilio.api_keys]]\nsid = "{KEY_B}"\n',
                "twilio.api_keys[1]: set secret_file or secret_env: where this key's secret is",
            ),
            (
                key_list(KEY_A, listed=(KEY_A,)) + 'secret_env = "X"\n',
                "twilio.api_keys[0].secret_file: set secret_file or secret_env, not both",
            ),
            (
                key_list(KEY_A, listed=(KEY_A,)) + 'secret = "hunter2"\n',
                "twilio.api_keys[0].secret: unknown key; expected one of active, secret_env, secret_file, sid",
            ),
            (
                key_list("", listed=(KEY_A,)) + 'active = "yes"\n',
                "twilio.api_keys[0].active: must be a boolean",
            ),
            (
                # The inactive key's secret is checked too: switching to it must not be when it turns out missing.
                key_list(KEY_A, listed=(KEY_A,))
                + f'[[twilio.api_keys]]\nsid = "{KEY_B}"\nsecret_env = "UNSET_SECRET"\n',
                "twilio.api_keys[1].secret_env: the environment variable it names is not set or empty",
            ),
            (
                key_list(KEY_A, listed=(KEY_A,)) + f'[[twilio.api_keys]]\nsid = "{KEY_B}"\nsecret_file = "missing"\n',
                "twilio.api_keys[1].secret_file: cannot read the file it names: No such file or directory",
            ),
        ],
    )
    def test_errors(self, pki: Pki, write_config: WriteConfig, keys: str, message: str) -> None:
        """Each defect names the entry and the key, and never a secret or where it is."""
        path = write_config(with_keys(pki, keys))
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ={})
        assert str(caught.value) == f"{path}: {message}"


class TestSignedExpiries:
    """The ledger of what each key signed, and when its tokens are all gone."""

    def test_latest_and_live_until(self) -> None:
        """The latest expiry wins; before the start, max_ttl bounds what is unknown."""
        signed = SignedExpiries(started_at=1000)
        assert signed.latest(KEY_A) is None
        for expires_at in (5000, 9000, 7000):
            signed.record(KEY_A, expires_at)
        assert signed.latest(KEY_A) == 9000
        assert signed.live_until(KEY_A, max_ttl=3600) == 9000
        assert signed.live_until(KEY_A, max_ttl=86400) == 1000 + 86400
        assert signed.live_until(KEY_B, max_ttl=3600) == 1000 + 3600


def iso(unix: int) -> str:
    """Unix seconds as the log writes them."""
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.usefixtures("secret_files")
class TestRotation:
    """Switching the active key is a reload; issuing never stops."""

    def test_switch_under_load(self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]) -> None:
        """Tokens before the switch verify with the old secret, after it with the new; none fails; the log says when A is done."""
        port = free_port()
        process = serve(with_keys(pki, key_list(KEY_A), listen=f"127.0.0.1:{port}"), tmp_path, leak_watch, processes)
        load = SteadyLoad(pki, port, leak_watch, connections=3, fresh=1)
        load.wait_for(30)
        replace_file(tmp_path / "synctoken.toml", with_keys(pki, key_list(KEY_B), listen=f"127.0.0.1:{port}").encode())
        [rotated] = process.wait_for_records("twilio.key_rotated")
        load.wait_for(30)
        outcomes = load.stop()

        assert [o.code for o in outcomes if o.code != grpc.StatusCode.OK] == []
        claims: dict[str, list[dict[str, int]]] = {KEY_A: [], KEY_B: []}
        for outcome in outcomes:
            sid = jwt.decode(outcome.token, options={"verify_signature": False})["iss"]
            claims[sid].append(jwt.decode(outcome.token, SECRETS[sid], algorithms=["HS256"]))
        assert claims[KEY_A]
        assert claims[KEY_B]
        # One event loop issues them, so the switch is one instant: no A after any B.
        assert max(c["nbf"] for c in claims[KEY_A]) <= min(c["nbf"] for c in claims[KEY_B])

        last_a = max(c["exp"] for c in claims[KEY_A])
        started = int(dt.datetime.fromisoformat(rotated["unknown_before"]).timestamp())
        assert rotated == rotated | {
            "previous_key": KEY_A,
            "active_key": KEY_B,
            "previous_key_last_expiry": iso(last_a),
            # Just started: what a process before it signed is unknown, so the longest max_ttl (24h) from its start.
            "previous_key_tokens_live_until": iso(max(last_a, started + 24 * 3600)),
        }

    def test_check_config_warns_about_the_inactive_key(self, pki: Pki, write_config: WriteConfig) -> None:
        """check-config cannot know when the old key last signed, and says so: wait max_ttl, or read the server's line."""
        path = write_config(with_keys(pki, key_list(KEY_B)))
        result = check_config(path)
        assert result.returncode == 0, result.stderr
        assert result.stderr == (
            f"synctoken: warning: twilio.api_keys: {KEY_A} is listed but not active. If it is a new key waiting "
            "for active = true, nothing is needed. If it signed before, tokens it signed may still be live: delete "
            "it at Twilio only max_ttl (24h) after it stopped signing, or after previous_key_tokens_live_until in "
            "the servers' twilio.key_rotated line\n"
        )
        assert all(secret not in result.stdout for secret in SECRETS.values())
