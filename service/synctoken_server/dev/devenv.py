"""`synctoken dev`: a throwaway CA, certificates, credentials and config, for trying synctoken locally."""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from synctoken_server.config.twilio import ENV_ACCOUNT_SID, ENV_API_KEY, ENV_API_SECRET
from synctoken_server.dev import files
from synctoken_server.dev.pki import CertificateAuthority, KeyPair, LeafSpec

DEV_TRUST_DOMAIN = "synctoken.test"
DEV_CLIENT_ID = f"spiffe://{DEV_TRUST_DOMAIN}/dev/backend"
DEV_SYNC_SERVICE_SID = "IS" + "0" * 32
ENV_SYNC_SERVICE_SID = "TWILIO_SYNC_SERVICE_SID"
# Well-formed, obviously fake SIDs: tokens signed with them are valid JWTs
# that Twilio will refuse.
DEV_ACCOUNT_SID = "AC" + "0" * 32
DEV_API_KEY_SID = "SK" + "0" * 32

CA_FILE, CA_KEY = "ca.pem", "ca-key.pem"  # the key stays, so that `synctoken dev issue` can sign more
# The server's client_ca_file: a copy of the CA at first, so that rotating the
# client CA (see the README) leaves ca.pem, which clients check the server with, alone.
CLIENTS_CA_FILE = "clients-ca.pem"
SERVER_CERT, SERVER_KEY = "server.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client.pem", "client-key.pem"
SECRET_FILE = "api_secret"  # noqa: S105 - a file name, not a password
CONFIG_FILE = "config.toml"
_PKI_FILES = (CA_FILE, CA_KEY, CLIENTS_CA_FILE, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)
_PAIRS = ((CA_FILE, CA_KEY), (SERVER_CERT, SERVER_KEY), (CLIENT_CERT, CLIENT_KEY))
_DEV_SECRET = re.compile(rb"[0-9a-f]{32}\n")
"""What dev writes as the secret, the newline last: anything else is a write cut short, or not dev's."""
_TWILIO_VARIABLES = (ENV_ACCOUNT_SID, ENV_API_KEY, ENV_API_SECRET)

RENEW_MARGIN = dt.timedelta(days=7)
"""Dev certificates last 30 days; they are remade when less than this is left."""


class DevSetupError(Exception):
    """The dev environment cannot be prepared as asked; the message says what to change."""


@dataclass(frozen=True)
class DevEnvironment:
    """What `prepare` made: where the config is, and whether tokens will be real."""

    directory: Path
    config_path: Path
    real_credentials: bool
    sync_service_sid: str
    secret_remade: bool = False
    """The secret file was there but held no dev secret (empty, or cut short by an interrupted run)."""

    def grpcurl_command(self, port: int) -> str:
        """The exact grpcurl command that mints a token from this environment."""
        d = self.directory.resolve()  # works from any folder, not just the one dev ran in
        return (
            f"{_grpcurl()} -cacert {d / CA_FILE} -cert {d / CLIENT_CERT} -key {d / CLIENT_KEY} "
            f"""-d '{{"identity":"alice","sync":{{}}}}' localhost:{port} synctoken.v1.TokenService/IssueToken"""
        )


def prepare(
    directory: Path, port: int, environ: Mapping[str, str] | None = None, config_name: str = CONFIG_FILE
) -> DevEnvironment:
    """Make (or reuse) the dev PKI under `directory` and write `config_name` there, serving on localhost:`port`."""
    env = os.environ if environ is None else environ
    given = [name for name in _TWILIO_VARIABLES if env.get(name)]
    if given and len(given) < len(_TWILIO_VARIABLES):
        # Half a set of credentials is a mistake, not a wish for dev ones.
        missing = [name for name in _TWILIO_VARIABLES if name not in given]
        verb = "is" if len(missing) == 1 else "are"
        msg = (
            f"{' and '.join(missing)} {verb} not set: "
            f"set all of {', '.join(_TWILIO_VARIABLES)} for real tokens, or none for dev ones"
        )
        raise DevSetupError(msg)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    if not _pki_usable(directory, dt.datetime.now(dt.UTC)):
        _make_pki(directory)
    real = bool(given)
    service_sid = env.get(ENV_SYNC_SERVICE_SID) or DEV_SYNC_SERVICE_SID
    remade = False
    if real:
        # The loader reads the TWILIO_* variables itself; nothing secret is written.
        twilio = "[twilio]\n"
    else:
        secret_path = directory / SECRET_FILE
        # Remade, not refused: it signs only tokens Twilio refuses, so nothing of value is lost.
        remade = secret_path.exists() and not _DEV_SECRET.fullmatch(secret_path.read_bytes())
        if remade or not secret_path.exists():
            files.put(secret_path, (secrets.token_hex(16) + "\n").encode("ascii"), 0o600)
        # The current key-list form, so that a dev config copied as a start is not the old one.
        twilio = (
            f'[twilio]\naccount_sid = "{DEV_ACCOUNT_SID}"\n\n'
            f'[[twilio.api_keys]]\nsid = "{DEV_API_KEY_SID}"\nsecret_file = "{SECRET_FILE}"\nactive = true\n'
        )
    config_path = directory / config_name
    config = _CONFIG_TEMPLATE.format(port=port, twilio=twilio, service=service_sid)
    files.put(config_path, config.encode("utf-8"), 0o644)
    return DevEnvironment(directory, config_path, real, service_sid, secret_remade=remade)


def _grpcurl() -> str:
    # `make dev` runs us from a venv that is not on PATH; grpcurl sits beside us there.
    beside = Path(sys.executable).parent / "grpcurl"
    return str(beside) if shutil.which("grpcurl") is None and beside.exists() else "grpcurl"


def _pki_usable(directory: Path, now: dt.datetime) -> bool:
    # Every handshake fails once a certificate expires, so renew well before. A file that does not parse,
    # or a key that is not its certificate's (an earlier run stopped part-way), is remade too.
    if not all((directory / name).exists() for name in _PKI_FILES):
        return False
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        x509.load_pem_x509_certificates((directory / CLIENTS_CA_FILE).read_bytes())  # one CA, or more in a rotation
        for cert_name, key_name in _PAIRS:
            certificate = x509.load_pem_x509_certificate((directory / cert_name).read_bytes())
            key = serialization.load_pem_private_key((directory / key_name).read_bytes(), password=None)
            if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
                return False
            if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc - RENEW_MARGIN:
                return False
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _make_pki(directory: Path) -> None:
    ca = CertificateAuthority("synctoken dev CA")
    KeyPair(ca.cert_pem, ca.key_pem).write(directory / CA_FILE, directory / CA_KEY)
    files.put(directory / CLIENTS_CA_FILE, ca.cert_pem, 0o644)
    ca.issue(LeafSpec("localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1", "::1"), server=True)).write(
        directory / SERVER_CERT, directory / SERVER_KEY
    )
    ca.issue(LeafSpec("dev backend", uris=(DEV_CLIENT_ID,))).write(directory / CLIENT_CERT, directory / CLIENT_KEY)


_CONFIG_TEMPLATE = f"""\
# Written by `synctoken dev`; rewritten on every run. Not for production.
[server]
listen = "localhost:{{port}}"
drain_delay = "0s"  # no balancer watches a dev server's health

[tls]
cert_file = "{SERVER_CERT}"
key_file = "{SERVER_KEY}"
client_ca_file = "{CLIENTS_CA_FILE}"

[identity]
source = "spiffe"
trust_domains = ["{DEV_TRUST_DOMAIN}"]

{{twilio}}
[defaults]
default_ttl = "1h"
max_ttl = "4h"

[[callers]]
id = "{DEV_CLIENT_ID}"
sync_services = ["{{service}}"]
default_sync_service = "{{service}}"
allowed_identity_characters = "@"
"""
