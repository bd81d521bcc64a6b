"""The suite's names: trust domain, callers, Twilio SIDs, the API secret, the repository and its commands."""

from __future__ import annotations

import sys
from pathlib import Path

TRUST_DOMAIN = "example.org"
ACCOUNT_SID = "AC" + "1" * 32
API_KEY_SID = "SK" + "2" * 32
API_SECRET = "s3cr3t-" + "x" * 25  # distinctive, so a leak is easy to grep for
SERVICE_A = "IS" + "a" * 32
SERVICE_B = "IS" + "b" * 32
SERVICE_C = "IS" + "c" * 32

BFF_ID = f"spiffe://{TRUST_DOMAIN}/ns/web/sa/bff"
CHAT_WORKER_ID = f"spiffe://{TRUST_DOMAIN}/ns/chat/sa/worker"
CHAT_ADMIN_ID = f"spiffe://{TRUST_DOMAIN}/ns/chat/sa/admin"
STRANGER_ID = f"spiffe://{TRUST_DOMAIN}/ns/other/sa/stranger"
DNS_CALLER = "billing.internal.example.com"

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root."""

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
SYNCTOKEN = str(Path(sys.executable).parent / "synctoken")
