"""The demo authenticator: a random anonymous identity per browser, kept in a signed HttpOnly cookie."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from starlette.requests import Request
from starlette.responses import Response

from synctoken_bff._addresslimit import AddressLimiter, NewIdentityLimit
from synctoken_bff._errors import Refusal

COOKIE_NAME = "synctoken_bff_identity"
# A year: the identity is anonymous and worthless once the browser drops it.
_MAX_AGE = 365 * 24 * 3600


class AnonymousSessions:
    """Gives each browser an identity like "anon-3f2a...", remembered in a cookie signed with HMAC-SHA256.

    Replace it with your login: `create_app(authenticate=...)` takes any
    function of the request that returns the user id, or None for no user.
    New identities are limited per client address (`limit`): a client that
    drops its cookie on every request would otherwise be a new user each time.
    """

    def __init__(self, secret: bytes, limit: NewIdentityLimit | None = None) -> None:
        self._secret = secret
        self._new_identities = AddressLimiter(limit or NewIdentityLimit())

    def identity(self, request: Request) -> str | None:
        """The identity in the request's cookie, if its signature holds; None otherwise."""
        value = request.cookies.get(COOKIE_NAME, "")
        identity, _, signature = value.rpartition(".")
        if not identity or not signature:
            return None
        try:
            given = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        except (binascii.Error, ValueError):
            return None
        # compare_digest: a byte-by-byte compare would time how much of a forged signature is right.
        return identity if hmac.compare_digest(given, self._sign(identity)) else None

    def authenticate(self, request: Request) -> str:
        """The request's identity, or a new one that `remember` will set in the response.

        Raise Refusal (429) when the client's address has had its share of new identities.
        """
        identity = self.identity(request)
        if identity is None:
            wait = self._new_identities.take(request.client.host if request.client else None)
            if wait is not None:
                raise Refusal(
                    429,
                    "RESOURCE_EXHAUSTED",
                    "TOO_MANY_NEW_SESSIONS",
                    "too many new sessions from this address; keep the cookie, or try again later",
                    retry_after=wait,
                )
            identity = f"anon-{secrets.token_hex(16)}"
            request.state.new_identity = identity
        return identity

    def remember(self, request: Request, response: Response) -> None:
        """Set the cookie for an identity made by this request (Secure when the request came over https)."""
        identity: str | None = getattr(request.state, "new_identity", None)
        if identity is None:
            return
        signature = base64.urlsafe_b64encode(self._sign(identity)).rstrip(b"=").decode()
        response.set_cookie(
            COOKIE_NAME,
            f"{identity}.{signature}",
            max_age=_MAX_AGE,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )

    def _sign(self, identity: str) -> bytes:
        return hmac.new(self._secret, identity.encode(), hashlib.sha256).digest()
