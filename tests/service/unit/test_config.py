"""The config loader: every failure names the file and the key; a good file loads into frozen data."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from support.configs import POLICY_TOML, SECRET_ENV, WriteConfig, config_text
from support.constants import ACCOUNT_SID, API_KEY_SID, API_SECRET, SERVICE_A, SERVICE_B
from support.pki import Pki, openssl
from synctoken_server.authn.callercert import CallerIdSource
from synctoken_server.config import tlsfiles
from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import load_config
from synctoken_server.config.tlsfiles import ServerTlsFiles
from synctoken_server.tokens.minting import check_secret


def expect_error(path: Path, message: str, environ: dict[str, str] | None = None) -> None:
    """Loading `path` fails with exactly `<path>: <message>`."""
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=SECRET_ENV if environ is None else environ)
    assert str(caught.value) == f"{path}: {message}"


class TestValid:
    """A good config."""

    def test_loads(self, pki: Pki, write_config: WriteConfig) -> None:
        """The suite's config loads with every default applied."""
        config = load_config(write_config(config_text(pki)), environ=SECRET_ENV)
        assert config.listen == "127.0.0.1:0"
        assert config.caller_id_source is CallerIdSource.SPIFFE
        assert config.trust_domains == frozenset({"example.org"})
        assert (config.credentials.account_sid, config.credentials.api_key_sid) == (ACCOUNT_SID, API_KEY_SID)
        assert config.credentials.api_secret == API_SECRET
        chat = next(r for r in config.policy if r.caller.endswith("/*"))
        assert (chat.default_ttl, chat.max_ttl) == (600, 1800)
        assert chat.identity_pattern is not None
        assert chat.identity_pattern.pattern == "user-[0-9]+"
        assert chat.identity_pattern.matches("user-42")
        assert not chat.identity_pattern.matches("user-\u0664\u0662")  # Arabic-Indic digits are no [0-9]

    def test_re2_only_syntax(self, pki: Pki, write_config: WriteConfig) -> None:
        """Patterns use RE2's syntax, so \\pL and \\x{...} work, and (?i) folds ASCII letters only."""
        text = replaced(pki, PATTERN, r"identity_pattern = '(?i)\pL+-\x{41}'")
        chat = next(r for r in load_config(write_config(text), environ=SECRET_ENV).policy if r.caller.endswith("/*"))
        assert chat.identity_pattern is not None
        assert chat.identity_pattern.matches("\u00e9t\u00e9-a")
        assert not chat.identity_pattern.matches("user-\u212a")  # KELVIN SIGN, which RE2 would fold onto k

    def test_twilio_from_environment(self, pki: Pki, write_config: WriteConfig) -> None:
        """Without account_sid and api_key in the file, Twilio's guide's variable names are read."""
        text = config_text(pki).replace(f'account_sid = "{ACCOUNT_SID}"\napi_key = "{API_KEY_SID}"\n', "")
        environ = SECRET_ENV | {"TWILIO_ACCOUNT_SID": "AC" + "9" * 32, "TWILIO_API_KEY": "SK" + "8" * 32}
        config = load_config(write_config(text), environ=environ)
        assert config.credentials.account_sid == "AC" + "9" * 32
        assert config.credentials.api_key_sid == "SK" + "8" * 32

    def test_secret_from_file(self, pki: Pki, write_config: WriteConfig, tmp_path: Path) -> None:
        """api_secret_file is read relative to the config file, trailing newline dropped."""
        (tmp_path / "secret").write_text(API_SECRET + "\n", encoding="utf-8")
        text = config_text(pki).replace("[twilio]\n", '[twilio]\napi_secret_file = "secret"\n')
        assert load_config(write_config(text), environ={}).credentials.api_secret == API_SECRET

    def test_whole_trust_domain_prefix(self, pki: Pki, write_config: WriteConfig) -> None:
        """spiffe://td/* is every workload in td, and never the trust domain's own id."""
        text = config_text(pki).replace('id = "spiffe://example.org/ns/chat/*"', 'id = "spiffe://example.org/*"')
        policy = load_config(write_config(text), environ=SECRET_ENV).policy
        rule = policy.rule_for("spiffe://example.org/ns/other/sa/x")
        assert rule is not None
        assert rule.caller == "spiffe://example.org/*"
        assert policy.rule_for("spiffe://example.org") is None

    def test_secret_from_named_variable(self, pki: Pki, write_config: WriteConfig) -> None:
        """api_secret_env names another variable to read the secret from."""
        text = config_text(pki).replace("[twilio]\n", '[twilio]\napi_secret_env = "MY_SECRET"\n')
        assert load_config(write_config(text), environ={"MY_SECRET": "abc"}).credentials.api_secret == "abc"


def replaced(pki: Pki, old: str, new: str) -> str:
    """The suite's config with one piece of text replaced (which must be there)."""
    text = config_text(pki)
    assert old in text
    return text.replace(old, new, 1)


CALLER_2 = 'max_ttl = "24h"'  # only callers[2] sets this
ADMIN_ID = 'id = "spiffe://example.org/ns/chat/sa/admin"'  # callers[2].id
PATTERN = 'identity_pattern = "user-[0-9]+"'  # only callers[1] has one


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "[server]",
            "[serverz]",
            "serverz: unknown key; expected one of audit, callers, defaults, health, identity, limits, mesh, metrics, server, tls, tracing, twilio",
        ),
        (
            '[[callers]]\nid = "spiffe://example.org/ns/chat/*"',
            '[[callers]]\nmax_tll = "1h"\nid = "spiffe://example.org/ns/chat/*"',
            "callers[1].max_tll: unknown key; expected one of allowed_identity_characters, burst, default_sync_service, default_ttl, id, identity_burst, identity_pattern, identity_rate, max_ttl, rate, shadow, sync_services",
        ),
        (CALLER_2, 'max_ttl = "30h"', "callers[2].max_ttl: 30h is above the 24h limit"),
        (CALLER_2, 'max_ttl = "2m"', "callers[2].max_ttl: 2m is below the 3m minimum"),
        (CALLER_2, 'max_ttl = "soon"', "callers[2].max_ttl: 'soon' is not a duration like 90s, 15m, 1h or 1h30m"),
        (CALLER_2, "max_ttl = 3600", "callers[2].max_ttl: must be a string"),
        ('default_ttl = "10m"', 'default_ttl = "1h"', "callers[1].default_ttl: 1h is above callers[1].max_ttl 30m"),
        (
            'default_ttl = "1h"\nmax_ttl = "4h"',
            'default_ttl = "5h"\nmax_ttl = "4h"',
            "defaults.default_ttl: 5h is above defaults.max_ttl 4h",
        ),
        (
            f'sync_services = ["{SERVICE_A}",',
            'sync_services = ["IS123",',
            "callers[0].sync_services[0]: 'IS123' is not a Sync service SID (IS + 32 lower-case hex digits)",
        ),
        (
            f'sync_services = ["{SERVICE_A}", "{SERVICE_B}"]',
            f'sync_services = "{SERVICE_A}"',
            "callers[0].sync_services: must be a list",
        ),
        (
            f'sync_services = ["{SERVICE_A}", "{SERVICE_B}"]',
            "sync_services = []",
            "callers[0].sync_services: must list at least one Sync service SID",
        ),
        (
            f'default_sync_service = "{SERVICE_A}"',
            f'default_sync_service = "IS{"f" * 32}"',
            f"callers[0].default_sync_service: IS{'f' * 32} is not in callers[0].sync_services",
        ),
        (
            PATTERN,
            "identity_pattern = 'user-[0-9'",
            "callers[1].identity_pattern: not a valid RE2 pattern: missing ]: [0-9",
        ),
        (
            PATTERN,
            r"identity_pattern = '(user)-\1'",
            r"callers[1].identity_pattern: not a valid RE2 pattern: invalid escape sequence: \1 (RE2 has no backreferences)",
        ),
        (
            PATTERN,
            "identity_pattern = '(?P<u>user)-(?P=u)'",
            "callers[1].identity_pattern: not a valid RE2 pattern: invalid perl operator: (?P (RE2 has no backreferences)",
        ),
        (
            PATTERN,
            "identity_pattern = 'user-(?=[0-9])[0-9]+'",
            "callers[1].identity_pattern: not a valid RE2 pattern: invalid perl operator: (?= (RE2 has no lookahead or lookbehind)",
        ),
        (
            PATTERN,
            "identity_pattern = '(?<!admin)-[0-9]+'",
            "callers[1].identity_pattern: not a valid RE2 pattern: invalid perl operator: (?<! (RE2 has no lookahead or lookbehind)",
        ),
        (
            PATTERN,
            "identity_pattern = 'user-[0-9]{1001}'",
            "callers[1].identity_pattern: not a valid RE2 pattern: invalid repetition size: {1001} (RE2 repeats at most 1000 times)",
        ),
        (
            PATTERN,
            r"identity_pattern = 'user-\pL{1000}'",
            "callers[1].identity_pattern: not a valid RE2 pattern: pattern too large - compile failed (it needs more than RE2's 8 MiB memory budget)",
        ),
        (
            PATTERN,
            r"identity_pattern = 'user-[0-9]+\Z'",
            r"callers[1].identity_pattern: not a valid RE2 pattern: invalid escape sequence: \Z (identities are matched whole, so no end anchor is needed)",
        ),
        (
            PATTERN,
            r"identity_pattern = 'user-\C+'",
            r"callers[1].identity_pattern: \C (any byte) can match half of a character; use . instead",
        ),
        (
            PATTERN,
            "identity_pattern = 'user-[0-9]{,3}'",
            "callers[1].identity_pattern: {,3} is literal text in RE2, not a repetition; write {0,3}",
        ),
        (
            'allowed_identity_characters = "@"',
            'allowed_identity_characters = "@a"',
            "callers[0].allowed_identity_characters: 'a' are not reserved characters; only \"!*'();:@&=+$,/?%#[]\" need allowing",
        ),
        (
            ADMIN_ID,
            'id = "spiffe://example.org/ns/web/sa/bff"',
            "callers[2].id: spiffe://example.org/ns/web/sa/bff is already the id of callers[0]",
        ),
        (
            ADMIN_ID,
            'id = "spiffe://example.org/ns//admin"',
            "callers[2].id: 'spiffe://example.org/ns//admin' is not a SPIFFE ID (spiffe://<trust domain>/<path>, the trust domain in a-z 0-9 . - _, path segments in A-Z a-z 0-9 . - _ and none empty, '.' or '..'); a prefix ends in /*",
        ),
        (
            ADMIN_ID,
            'id = "spiffe://EXAMPLE.org/ns/chat/sa/admin"',
            "callers[2].id: 'spiffe://EXAMPLE.org/ns/chat/sa/admin' is not a SPIFFE ID (spiffe://<trust domain>/<path>, the trust domain in a-z 0-9 . - _, path segments in A-Z a-z 0-9 . - _ and none empty, '.' or '..'); a prefix ends in /*",
        ),
        (
            ADMIN_ID,
            'id = "spiffe://example.org/ns/chat/sa/admin/"',
            "callers[2].id: 'spiffe://example.org/ns/chat/sa/admin/' is not a SPIFFE ID (spiffe://<trust domain>/<path>, the trust domain in a-z 0-9 . - _, path segments in A-Z a-z 0-9 . - _ and none empty, '.' or '..'); a prefix ends in /*",
        ),
        (
            ADMIN_ID,
            'id = "spiffe://example.org/ns/chat/sa/admin\\n"',
            "callers[2].id: 'spiffe://example.org/ns/chat/sa/admin\\n' is not a SPIFFE ID (spiffe://<trust domain>/<path>, the trust domain in a-z 0-9 . - _, path segments in A-Z a-z 0-9 . - _ and none empty, '.' or '..'); a prefix ends in /*",
        ),
        (
            'id = "spiffe://example.org/ns/chat/*"',
            'id = "spiffe://example.org/ns/chat*"',
            "callers[1].id: 'spiffe://example.org/ns/chat*' is not a SPIFFE ID (spiffe://<trust domain>/<path>, the trust domain in a-z 0-9 . - _, path segments in A-Z a-z 0-9 . - _ and none empty, '.' or '..'); a prefix ends in /*",
        ),
        (
            ADMIN_ID,
            'id = "spiffe://example.org"',
            "callers[2].id: 'spiffe://example.org' is a trust domain, not a workload: add a path, or write spiffe://example.org/* for all its workloads",
        ),
        (
            ADMIN_ID,
            'id = "spiffe://other.org/admin"',
            "callers[2].id: trust domain other.org is not in identity.trust_domains",
        ),
        (
            'listen = "127.0.0.1:0"',
            'listen = "127.0.0.1"',
            "server.listen: '127.0.0.1' is not host:port (e.g. 127.0.0.1:50051 or [::]:50051)",
        ),
        (
            'listen = "127.0.0.1:0"',
            'listen = "127.0.0.1:70000"',
            "server.listen: '127.0.0.1:70000' is not host:port (e.g. 127.0.0.1:50051 or [::]:50051)",
        ),
        ('source = "spiffe"', 'source = "x509_cn"', "identity.source: 'x509_cn' is not one of spiffe, dns_san"),
        (
            'trust_domains = ["example.org"]',
            "trust_domains = []",
            "identity.trust_domains: must list at least one trust domain",
        ),
        (
            'trust_domains = ["example.org"]',
            'trust_domains = ["Example.org"]',
            "identity.trust_domains[0]: 'Example.org' is not a trust domain name (a-z 0-9 . - _ only, with no scheme, port or path)",
        ),
        (
            'trust_domains = ["example.org"]',
            'trust_domains = ["example.org/ns"]',
            "identity.trust_domains[0]: 'example.org/ns' is not a trust domain name (a-z 0-9 . - _ only, with no scheme, port or path)",
        ),
        (
            'trust_domains = ["example.org"]',
            'trust_domains = ["example.org", "spiffe://example.org"]',
            "identity.trust_domains[1]: 'spiffe://example.org' is not a trust domain name (a-z 0-9 . - _ only, with no scheme, port or path)",
        ),
        (
            'trust_domains = ["example.org"]',
            'trust_domains = ["example.org:8443"]',
            "identity.trust_domains[0]: 'example.org:8443' is not a trust domain name (a-z 0-9 . - _ only, with no scheme, port or path)",
        ),
        (
            'trust_domains = ["example.org"]',
            'trust_domains = ["example.org\\n"]',
            "identity.trust_domains[0]: 'example.org\\n' is not a trust domain name (a-z 0-9 . - _ only, with no scheme, port or path)",
        ),
        (
            f'account_sid = "{ACCOUNT_SID}"',
            'account_sid = "AC123"',
            "twilio.account_sid: must be AC followed by 32 lower-case hex digits",
        ),
        (
            f'api_key = "{API_KEY_SID}"',
            f'api_key = "{ACCOUNT_SID}"',
            "twilio.api_key: must be an API key SID: SK followed by 32 lower-case hex digits",
        ),
        (
            f'api_key = "{API_KEY_SID}"',
            "",
            "twilio.api_key: missing, and the environment variable TWILIO_API_KEY is not set",
        ),
        (
            f'api_key = "{API_KEY_SID}"',
            'api_secret = "hunter2"',
            "twilio.api_secret: unknown key; expected one of account_sid, api_key, api_keys, api_secret_env, api_secret_file",
        ),
        (
            f'api_key = "{API_KEY_SID}"',
            f'api_key = "{API_KEY_SID}"\napi_secret_file = "nope"',
            "twilio.api_secret_file: cannot read the file it names: No such file or directory",
        ),
        (
            f'api_key = "{API_KEY_SID}"',
            f'api_key = "{API_KEY_SID}"\napi_secret_file = "a"\napi_secret_env = "B"',
            "twilio.api_secret_file: set api_secret_file or api_secret_env, not both",
        ),
        (
            "[[callers]]",
            "callers = 1\n[[x]]",
            "x: unknown key; expected one of audit, callers, defaults, health, identity, limits, mesh, metrics, server, tls, tracing, twilio",
        ),
        (
            "[server]",
            "[server\n",
            "not valid TOML: Expected ']' at the end of a table declaration (at line 2, column 8)",
        ),
    ],
)
def test_config_error(pki: Pki, write_config: WriteConfig, old: str, new: str, message: str) -> None:
    """Each defect is reported with the file, the key path and what is wrong."""
    expect_error(write_config(replaced(pki, old, new)), message)


class TestFilesAndEnvironment:
    """Errors that depend on files and variables rather than text."""

    def test_missing_secret_variable(self, pki: Pki, write_config: WriteConfig) -> None:
        """No secret anywhere: the message names the variable."""
        expect_error(
            write_config(config_text(pki)),
            "twilio.api_secret_env: the environment variable TWILIO_API_SECRET is not set or empty",
            environ={},
        )

    def test_missing_cert_file(self, pki: Pki, write_config: WriteConfig) -> None:
        """An unreadable TLS file is named with the OS's reason."""
        text = replaced(pki, str(pki.directory / "server.pem"), "/nonexistent/server.pem")
        expect_error(
            write_config(text), "tls.cert_file: cannot read /nonexistent/server.pem: No such file or directory"
        )

    def test_key_does_not_match_cert(self, pki: Pki, write_config: WriteConfig) -> None:
        """A key that belongs to another certificate is caught at load, not at the first handshake."""
        text = replaced(pki, str(pki.directory / "server-key.pem"), str(pki.directory / "bff-key.pem"))
        expect_error(write_config(text), "tls.key_file: does not match the first certificate in tls.cert_file")

    def test_cert_is_not_pem(self, pki: Pki, write_config: WriteConfig, tmp_path: Path) -> None:
        """A file that is not a PEM certificate is refused."""
        (tmp_path / "junk.pem").write_text("hello", encoding="utf-8")
        text = replaced(pki, str(pki.directory / "ca.pem"), str(tmp_path / "junk.pem"))
        expect_error(write_config(text), "tls.client_ca_file: is not a PEM certificate")

    @pytest.mark.parametrize(
        "caller", ["spiffe://example.org/ns/web/sa/bff", "Billing.internal.example.com", "billing.example.com."]
    )
    def test_dns_caller_must_be_dns_name(self, pki: Pki, write_config: WriteConfig, caller: str) -> None:
        """In dns_san mode, caller ids are lower-case DNS names."""
        policy = f'[[callers]]\nid = "{caller}"\nsync_services = ["{SERVICE_A}"]\n'
        text = config_text(pki, identity='[identity]\nsource = "dns_san"\n', policy=policy)
        expect_error(
            write_config(text), f"callers[0].id: {caller!r} is not a lower-case DNS name (identity.source is dns_san)"
        )

    def test_no_callers_is_allowed(self, pki: Pki, write_config: WriteConfig) -> None:
        """A config with no callers loads: it simply denies everyone."""
        text = config_text(pki, policy="")
        assert len(load_config(write_config(text), environ=SECRET_ENV).policy) == 0
        assert POLICY_TOML not in text


class TestServerSection:
    """[server]: the listen address, drain and connection timeouts."""

    def test_defaults(self, pki: Pki, write_config: WriteConfig) -> None:
        """Without the keys: 5 s drain, 10 s grace, 10 s handshakes, 5 min idle connections."""
        timeouts = load_config(write_config(config_text(pki)), environ=SECRET_ENV).timeouts
        assert (timeouts.drain_delay, timeouts.grace, timeouts.handshake, timeouts.idle) == (5, 10, 10, 300)
        assert timeouts.connection_age == 600

    def test_set(self, pki: Pki, write_config: WriteConfig) -> None:
        """Each key takes a duration; a zero drain is allowed."""
        text = replaced(
            pki,
            'listen = "127.0.0.1:0"',
            'listen = "127.0.0.1:0"\ndrain_delay = "0s"\ngrace = "30s"\nhandshake_timeout = "3s"\nidle_timeout = "1h"',
        )
        timeouts = load_config(write_config(text), environ=SECRET_ENV).timeouts
        assert (timeouts.drain_delay, timeouts.grace, timeouts.handshake, timeouts.idle) == (0, 30, 3, 3600)

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            ('drain_delay = "5"', "server.drain_delay: '5' is not a duration like 90s, 15m, 1h or 1h30m"),
            ('grace = "11m"', "server.grace: 11m is above the 10m limit"),
            ('handshake_timeout = "0s"', "server.handshake_timeout: 0s is below the 1s minimum"),
            ('idle_timeout = "\uff15s"', "server.idle_timeout: '\uff15s' is not a duration like 90s, 15m, 1h or 1h30m"),
            ('watch_interval = "11m"', "server.watch_interval: 11m is above the 10m limit"),
        ],
    )
    def test_bad_durations(self, pki: Pki, write_config: WriteConfig, line: str, message: str) -> None:
        """Bad or out-of-range durations name the key; digits are ASCII digits only."""
        expect_error(write_config(replaced(pki, 'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:0"\n{line}')), message)

    @pytest.mark.parametrize("port", ["\uff15\uff10\uff10\uff15\uff11", "\u0665\u0660\u0660\u0665\u0661", "+50051"])
    def test_port_is_ascii_digits(self, pki: Pki, write_config: WriteConfig, port: str) -> None:
        """Full-width, Arabic-Indic or signed port numbers are refused."""
        text = replaced(pki, 'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
        expect_error(
            write_config(text),
            f"server.listen: '127.0.0.1:{port}' is not host:port (e.g. 127.0.0.1:50051 or [::]:50051)",
        )


class TestTlsSection:
    """[tls]: the files and the expiry warning."""

    def test_expiry_warning(self, pki: Pki, write_config: WriteConfig) -> None:
        """Unset, the margin is left to the certificate's lifetime; set, it is a duration of at least a minute."""
        assert load_config(write_config(config_text(pki)), environ=SECRET_ENV).tls_expiry_warning is None
        text = replaced(pki, "[identity]", 'expiry_warning = "72h"\n\n[identity]')
        assert load_config(write_config(text), environ=SECRET_ENV).tls_expiry_warning == 72 * 3600
        text = replaced(pki, "[identity]", 'expiry_warning = "30s"\n\n[identity]')
        expect_error(write_config(text), "tls.expiry_warning: 30s is below the 1m minimum")


def self_signed(key: PrivateKey, directory: Path) -> tuple[Path, Path]:
    """A localhost certificate for `key`, and the key, written to `directory`."""
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    algorithm = None if isinstance(key, ed448.Ed448PrivateKey | ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, algorithm)
    )
    cert_path, key_path = directory / "odd.pem", directory / "odd-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def rsa_pss_key_beside_rsa_certificate(directory: Path) -> tuple[Path, Path]:
    """An RSA-PSS key file (openssl's) and an ordinary self-signed RSA certificate for the same key."""
    key_path = directory / "pss-key.pem"
    openssl("genpkey", "-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key_path))
    key_path.chmod(0o600)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)  # cryptography reads an RSA-PSS key as plain RSA
    cert_path, _ = self_signed(key, directory)
    return key_path, cert_path


PrivateKey = (
    ed448.Ed448PrivateKey
    | ed25519.Ed25519PrivateKey
    | dsa.DSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
)


class TestServerKeyTypes:
    """Keys gRPC's TLS cannot serve with are config errors, not a failure to listen or to handshake."""

    @pytest.mark.parametrize(
        ("make_key", "problem"),
        [
            (ed448.Ed448PrivateKey.generate, "an Ed448 key, which gRPC cannot present"),
            (ed25519.Ed25519PrivateKey.generate, "an Ed25519 key, which gRPC cannot present"),
            (lambda: dsa.generate_private_key(2048), "a DSA key, which gRPC cannot present"),
            (
                lambda: ec.generate_private_key(ec.SECP521R1()),
                "an ECDSA key on curve secp521r1, which gRPC cannot present",
            ),
            (
                lambda: ec.generate_private_key(ec.SECP256K1()),
                "an ECDSA key on curve secp256k1, which gRPC cannot present",
            ),
            (lambda: rsa.generate_private_key(65537, 1024), "a 1024-bit RSA key, too weak"),  # noqa: S505 - on purpose
        ],
    )
    def test_refused(
        self, pki: Pki, write_config: WriteConfig, tmp_path: Path, make_key: Callable[[], PrivateKey], problem: str
    ) -> None:
        """The message says what is wrong and what gRPC can use."""
        cert_path, key_path = self_signed(make_key(), tmp_path)
        text = replaced(pki, str(pki.directory / "server.pem"), str(cert_path))
        text = text.replace(str(pki.directory / "server-key.pem"), str(key_path))
        expect_error(
            write_config(text),
            f"tls.key_file: holds {problem}; gRPC serves RSA keys of 2048 bits or more and ECDSA keys on P-256 or P-384",
        )

    @pytest.mark.parametrize(
        "make_key", [lambda: rsa.generate_private_key(65537, 2048), lambda: ec.generate_private_key(ec.SECP384R1())]
    )
    def test_accepted(
        self, pki: Pki, write_config: WriteConfig, tmp_path: Path, make_key: Callable[[], PrivateKey]
    ) -> None:
        """RSA 2048 and P-384 load."""
        cert_path, key_path = self_signed(make_key(), tmp_path)
        text = replaced(pki, str(pki.directory / "server.pem"), str(cert_path))
        text = text.replace(str(pki.directory / "server-key.pem"), str(key_path))
        assert load_config(write_config(text), environ=SECRET_ENV).warnings == ()


class TestSecretHandling:
    """The secret's keys never echo their values, and readable secrets are warned about."""

    PASTED = "pasted-secret-" + "z" * 20

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            (
                f'api_secret_env = "{PASTED}"',
                "twilio.api_secret_env: the environment variable it names is not set or empty",
            ),
            (
                f'api_secret_file = "{PASTED}"',
                "twilio.api_secret_file: cannot read the file it names: No such file or directory",
            ),
        ],
    )
    def test_value_not_echoed(self, pki: Pki, write_config: WriteConfig, line: str, message: str) -> None:
        """A secret pasted into api_secret_env or api_secret_file is not printed back."""
        text = replaced(pki, f'api_key = "{API_KEY_SID}"', f'api_key = "{API_KEY_SID}"\n{line}')
        expect_error(write_config(text), message, environ={})

    def test_readable_files_warned(self, pki: Pki, write_config: WriteConfig, tmp_path: Path) -> None:
        """A 0644 secret file or server key loads, with a warning naming the key, the file and the mode."""
        secret = tmp_path / "secret"
        secret.write_text(API_SECRET, encoding="utf-8")
        secret.chmod(0o644)
        key = tmp_path / "server-key.pem"
        key.write_bytes((pki.directory / "server-key.pem").read_bytes())
        key.chmod(0o640)
        text = replaced(pki, str(pki.directory / "server-key.pem"), str(key))
        text = text.replace("[twilio]\n", '[twilio]\napi_secret_file = "secret"\n')
        path = write_config(text)
        advice = "make it readable by its owner only (chmod 600)"
        assert load_config(path, environ={}).warnings == (
            f"{path}: tls.key_file: {key} is readable by group or others (mode 0640); {advice}",
            # The file's path too: it was read, so it is a path, not a secret pasted into the key.
            f"{path}: twilio.api_secret_file: {path.parent / 'secret'} is readable by group or others (mode 0644); {advice}",
        )

    def test_private_files_not_warned(self, pki: Pki, write_config: WriteConfig) -> None:
        """The suite's 0600 keys give no warning."""
        assert load_config(write_config(config_text(pki)), environ=SECRET_ENV).warnings == ()


class TestSecretsPyJwtRefuses:
    """Secrets PyJWT would refuse as HMAC keys on every token are refused once, when the config loads."""

    ASYMMETRIC = "The specified key is an asymmetric key or x509 certificate and should not be used as an HMAC secret."
    JWK = (
        "The specified key looks like a JWK and should not be used directly as an HMAC secret."
        " Load it via PyJWK / HMACAlgorithm.from_jwk first."
    )
    # An Ed25519 SubjectPublicKeyInfo in DER: valid UTF-8, no whitespace, so only the DER check catches it.
    DER_PUBLIC_KEY = (bytes.fromhex("302a300506032b6570032100") + b"A" * 32).decode("ascii")

    @pytest.mark.parametrize(
        ("secret", "reason"),
        [
            ("ssh-ed25519AAAAC3NzaC1lZDI1NTE5", ASYMMETRIC),
            (DER_PUBLIC_KEY, ASYMMETRIC),
            ('{"kty":"oct","k":"c2VjcmV0"}', JWK),
            ('[{"kty":"oct","k":"c2VjcmV0"}]', JWK),
        ],
        ids=["ssh-key", "der-public-key", "jwk", "jwk-set"],
    )
    def test_refused_naming_the_key(
        self, pki: Pki, write_config: WriteConfig, tmp_path: Path, secret: str, reason: str
    ) -> None:
        """A secret file holding a key, not a secret, is a config error naming the key that points at it."""
        path = tmp_path / "secret"
        path.write_text(secret, encoding="utf-8")
        path.chmod(0o600)
        text = config_text(pki).replace("[twilio]\n", '[twilio]\napi_secret_file = "secret"\n')
        expect_error(
            write_config(text), f"twilio.api_secret_file: the API key secret cannot sign HS256 tokens: {reason}", {}
        )

    def test_refused_from_the_environment(self, pki: Pki, write_config: WriteConfig) -> None:
        """The same holds for a secret from a variable, in a key list: the message names that entry's key."""
        text = replaced(
            pki,
            f'api_key = "{API_KEY_SID}"',
            f'[[twilio.api_keys]]\nsid = "{API_KEY_SID}"\nsecret_env = "JWK_SECRET"\nactive = true',
        )
        expect_error(
            write_config(text),
            f"twilio.api_keys[0].secret_env: the API key secret cannot sign HS256 tokens: {self.JWK}",
            {"JWK_SECRET": '{"kty":"oct"}'},
        )

    @pytest.mark.parametrize(
        ("secret", "refused"),
        [
            ("", True),
            ("-----BEGIN PRIVATE KEY-----x-----END PRIVATE KEY-----", True),
            (API_SECRET, False),
            ("{not json", False),
        ],
    )
    def test_check_secret(self, secret: str, refused: bool) -> None:
        """check_secret refuses what PyJWT's HS256 key check refuses (PEM markers hold a space, so the loader's whitespace rule meets those first)."""
        assert (check_secret(secret) is not None) is refused


class TestKeysOnlyOpensslMakes:
    """Keys cryptography loads oddly or not at all are config errors too, never a traceback or "cannot listen"."""

    def test_rsa_pss(self, pki: Pki, write_config: WriteConfig, tmp_path: Path) -> None:
        """An RSA-PSS key loads as RSA, but BoringSSL cannot serve with it."""
        key, cert = tmp_path / "pss-key.pem", tmp_path / "pss.pem"
        openssl("req", "-x509", "-newkey", "rsa-pss", "-pkeyopt", "rsa_keygen_bits:2048", "-nodes",
                "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost", "-days", "1")  # fmt: skip
        key.chmod(0o600)
        text = replaced(pki, str(pki.directory / "server.pem"), str(cert))
        text = text.replace(str(pki.directory / "server-key.pem"), str(key))
        expect_error(
            write_config(text),
            "tls.key_file: holds an RSA-PSS key, which gRPC cannot present; "
            "gRPC serves RSA keys of 2048 bits or more and ECDSA keys on P-256 or P-384",
        )

    def test_curve_cryptography_does_not_know(self, pki: Pki, write_config: WriteConfig, tmp_path: Path) -> None:
        """A key on secp112r1 is refused by name of the key, not with cryptography's UnsupportedAlgorithm."""
        key = tmp_path / "odd-key.pem"
        openssl("ecparam", "-name", "secp112r1", "-genkey", "-noout", "-out", str(key))
        key.chmod(0o600)
        text = replaced(pki, str(pki.directory / "server-key.pem"), str(key))
        expect_error(
            write_config(text),
            "tls.key_file: is a kind of key that cannot be used; "
            "gRPC serves RSA keys of 2048 bits or more and ECDSA keys on P-256 or P-384",
        )

    def test_nul_in_secret_file_name(self, pki: Pki, write_config: WriteConfig) -> None:
        """A NUL in api_secret_file is a config error that still does not echo the value."""
        text = replaced(
            pki, f'api_key = "{API_KEY_SID}"', f'api_key = "{API_KEY_SID}"\napi_secret_file = "sec\\u0000ret"'
        )
        expect_error(
            write_config(text),
            "twilio.api_secret_file: cannot read the file it names: a file name cannot contain a NUL byte",
            environ={},
        )

    def test_rsa_pss_key_beside_an_rsa_certificate(self, pki: Pki, write_config: WriteConfig, tmp_path: Path) -> None:
        """An RSA-PSS key file with an ordinary RSA certificate for the same key: named from the file's PKCS#8."""
        key_path, cert_path = rsa_pss_key_beside_rsa_certificate(tmp_path)
        text = replaced(pki, str(pki.directory / "server.pem"), str(cert_path))
        text = text.replace(str(pki.directory / "server-key.pem"), str(key_path))
        expect_error(
            write_config(text),
            "tls.key_file: holds an RSA-PSS key, which gRPC cannot present; "
            "gRPC serves RSA keys of 2048 bits or more and ECDSA keys on P-256 or P-384",
        )

    def test_grpc_asked_for_what_the_checks_pass(self, pki: Pki, tmp_path: Path) -> None:
        """grpc_can_serve binds with the set: the suite's pair serves, and BoringSSL refuses an RSA-PSS key file."""
        files = ServerTlsFiles(pki.directory / "server.pem", pki.directory / "server-key.pem", pki.directory / "ca.pem")
        material = tlsfiles.read(files, (), dt.datetime.now(dt.UTC))
        assert tlsfiles.grpc_can_serve(material)
        key_path, cert_path = rsa_pss_key_beside_rsa_certificate(tmp_path)
        pss = replace(material, cert_chain_pem=cert_path.read_bytes(), private_key_pem=key_path.read_bytes())
        assert not tlsfiles.grpc_can_serve(pss)

    def test_client_ca_bundle_with_undecodable_extension(
        self, pki: Pki, write_config: WriteConfig, tmp_path: Path
    ) -> None:
        """A CA bundle holding a certificate whose SAN cannot be decoded is a config error, not a crash at serve."""
        bundle = tmp_path / "ca-bundle.pem"
        bundle.write_bytes(pki.ca.cert_pem + pki.clients["undecodable_uri_san"].cert_pem)
        text = replaced(pki, str(pki.directory / "ca.pem"), str(bundle))
        expect_error(write_config(text), "tls.client_ca_file: holds a certificate whose extensions cannot be decoded")
