"""Config text: the suite's policy, a complete config for its PKI, and the secret's environment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from support.constants import (
    ACCOUNT_SID,
    API_KEY_SID,
    API_SECRET,
    BFF_ID,
    CHAT_ADMIN_ID,
    SERVICE_A,
    SERVICE_B,
    SERVICE_C,
    TRUST_DOMAIN,
)
from support.pki import Pki

POLICY_TOML = f"""
[defaults]
default_ttl = "1h"
max_ttl = "4h"

[[callers]]
id = "{BFF_ID}"
sync_services = ["{SERVICE_A}", "{SERVICE_B}"]
default_sync_service = "{SERVICE_A}"
allowed_identity_characters = "@"

[[callers]]
id = "spiffe://{TRUST_DOMAIN}/ns/chat/*"
sync_services = ["{SERVICE_B}"]
identity_pattern = "user-[0-9]+"
default_ttl = "10m"
max_ttl = "30m"

[[callers]]
id = "{CHAT_ADMIN_ID}"
sync_services = ["{SERVICE_B}", "{SERVICE_C}"]
default_sync_service = "{SERVICE_C}"
max_ttl = "24h"
"""


def config_text(
    pki: Pki,
    *,
    identity: str | None = None,
    policy: str = POLICY_TOML,
    listen: str = "127.0.0.1:0",
    tls: str | None = None,
) -> str:
    """A complete config for the suite's PKI; the secret comes from TWILIO_API_SECRET.

    `tls`: the [tls] table's keys, in place of the suite's server files (see spiffe_tls).
    """
    identity_table = identity or f'[identity]\nsource = "spiffe"\ntrust_domains = ["{TRUST_DOMAIN}"]\n'
    d = pki.directory
    tls_keys = (
        tls
        or f'cert_file = "{d / "server.pem"}"\nkey_file = "{d / "server-key.pem"}"\nclient_ca_file = "{d / "ca.pem"}"'
    )
    return f"""
[server]
listen = "{listen}"

[tls]
{tls_keys}

{identity_table}

[twilio]
account_sid = "{ACCOUNT_SID}"
api_key = "{API_KEY_SID}"

{policy}
"""


SECRET_ENV = {"TWILIO_API_SECRET": API_SECRET}

WriteConfig = Callable[[str], Path]
"""The `write_config` fixture: writes config text to the test's synctoken.toml and returns its path."""


def spiffe_tls(endpoint: str | None = None, first_svid_timeout: str | None = None) -> str:
    """[tls] keys taking the certificate from the Workload API (`endpoint`, else SPIFFE_ENDPOINT_SOCKET's)."""
    keys = ['source = "spiffe"']
    if endpoint is not None:
        keys.append(f'endpoint_socket = "{endpoint}"')
    if first_svid_timeout is not None:
        keys.append(f'first_svid_timeout = "{first_svid_timeout}"')
    return "\n".join(keys)
