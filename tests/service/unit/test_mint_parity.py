"""The direct minter against the `twilio` library, byte for byte, on hundreds of generated inputs."""

from __future__ import annotations

import base64
import random
import time

import pytest

from support.constants import ACCOUNT_SID, API_KEY_SID, API_SECRET
from synctoken_server.durations import MAX_TTL_SECONDS, MIN_TTL_SECONDS
from synctoken_server.policy.rules import RESERVED_IDENTITY_CHARACTERS, Grant
from synctoken_server.tokens.minting import Minter, TokenTimes, TwilioCredentials, TwilioLibraryMinter

# Characters that JSON or URLs treat specially, or that ensure_ascii must escape: every
# URI-reserved character, quotes and backslash, controls, JavaScript's line separators,
# BMP and astral non-ASCII (emoji, a ZWJ sequence, a combining mark), a lone surrogate.
SPECIAL = [
    *RESERVED_IDENTITY_CHARACTERS,
    '"',
    "\\",
    "/",
    "\x00",
    "\n",
    "\t",
    "\x7f",
    "\u2028",
    "\u2029",
    "é",
    "ü",
    "ß",
    "中",
    "\ufeff",
    "e\u0301",
    "😀",
    "𝄞",
    "👩\u200d👩\u200d👧",
    "\U0010ffff",
    "\ud800",
    "<",
    ">",
    "&",
    "~",
    "-",
    "_",
    ".",
]
REGIONS = ["", "us1", "ie1", "au1", "de1", "jp1", "br1", "sg1", "in1", "zz99"]
TTLS = [1, 59, 60, MIN_TTL_SECONDS, 3599, 3600, 3601, MAX_TTL_SECONDS - 1, MAX_TTL_SECONDS]
# Issue times on either side of round numbers and of 2**31 (a 32-bit time_t's end).
ISSUED = [1, 999_999_999, 1_000_000_000, 1_764_420_000, 2**31 - 1, 2**31, 9_999_999_999]
# Where within the second twilio's own clock reads land: int() must truncate each to the issue second.
CLOCK_FRACTIONS = [0.0, 0.000001, 0.5, 0.999999]
SERVICES = ["", "IS" + "0" * 32, "IS" + "f" * 32]
SECRETS = [API_SECRET, "s" * 32, "clé-secrète-" + "é" * 20, "k" * 200]


def _text(rng: random.Random, most: int) -> str:
    """Up to `most` characters, about half of them special."""
    plain = "abcXYZ0189@."
    return "".join(
        rng.choice(SPECIAL) if rng.random() < 0.5 else rng.choice(plain) for _ in range(rng.randint(0, most))
    )


def _cases() -> list[tuple[str, Grant, TokenTimes, float, str]]:
    """Each special character alone as identity and as endpoint id, then random mixtures of everything."""
    cases: list[tuple[str, Grant, TokenTimes, float, str]] = []
    now = 1_764_420_000
    for i, char in enumerate(SPECIAL):
        for region in ("", "ie1"):
            grant = Grant("r", f"a{char}b", SERVICES[1], char, 3600, region)
            cases.append((f"char{i}-{region or 'none'}", grant, TokenTimes(now, now + 3600, now), 0.5, API_SECRET))
    rng = random.Random(11)  # noqa: S311 - test inputs, not secrets; seeded so a failing case reruns the same
    for i in range(400):
        ttl = rng.choice(TTLS)
        issued = rng.choice(ISSUED)
        endpoint = _text(rng, 12) if rng.random() < 0.5 else ""
        grant = Grant("r", _text(rng, 40), rng.choice(SERVICES), endpoint, ttl, rng.choice(REGIONS))
        times = TokenTimes(issued, issued + ttl, issued)
        cases.append((f"mix{i}", grant, times, rng.choice(CLOCK_FRACTIONS), rng.choice(SECRETS)))
    return cases


def _segments(token: str) -> list[bytes]:
    """The token's three segments, base64url-decoded."""
    return [base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in token.split(".")]


CASES = _cases()


@pytest.mark.parametrize(("grant", "times", "fraction", "secret"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_same_bytes_as_twilio(
    monkeypatch: pytest.MonkeyPatch, grant: Grant, times: TokenTimes, fraction: float, secret: str
) -> None:
    """Header bytes, payload bytes and the whole token equal what twilio's AccessToken writes for the same inputs."""
    credentials = TwilioCredentials(ACCOUNT_SID, API_KEY_SID, secret)
    ours = Minter(credentials).mint(grant, times)
    # twilio stamps jti from its own time.time() read, with no parameter for it; the clock is
    # patched for the reference call only, to a moment inside the issue second.
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: times.issued_at + fraction)
        theirs = TwilioLibraryMinter(credentials).mint(grant, times)
    ours_header, ours_payload, _ = _segments(ours)
    theirs_header, theirs_payload, _ = _segments(theirs)
    assert ours_header == theirs_header
    assert ours_payload == theirs_payload
    assert ours == theirs


def test_cases_cover_the_edges() -> None:
    """The generated cases include every region, TTL edge, issue time, clock fraction and secret, and absent fields."""
    grants = [c[1] for c in CASES]
    assert {g.region for g in grants} == set(REGIONS)
    assert {g.ttl for g in grants} >= set(TTLS)
    assert {c[2].issued_at for c in CASES} == set(ISSUED) | {1_764_420_000}
    assert {c[3] for c in CASES} == set(CLOCK_FRACTIONS)
    assert {c[4] for c in CASES} == set(SECRETS)
    assert any(not g.endpoint_id for g in grants)
    assert any(not g.identity for g in grants)
    assert any(not g.service_sid for g in grants)
    assert len(CASES) >= 400


@pytest.mark.parametrize("secret", ["", '{"kty":"oct","k":"c2VjcmV0"}', "ssh-ed25519AAAAC3NzaC1lZDI1NTE5"])
def test_unusable_secret_refused(secret: str) -> None:
    """A minter is never built around a secret PyJWT would refuse, however the credentials were made."""
    with pytest.raises(ValueError, match="cannot sign HS256 tokens"):
        Minter(TwilioCredentials(ACCOUNT_SID, API_KEY_SID, secret))
