"""BFF_ALLOWED_ORIGINS entries: exact origins only, written the way a browser serialises its Origin header.

The BFF answers allowed origins with credentialed CORS, so an entry that
stands for more than one origin (a wildcard, `null`, a pattern) would hand
a signed-in user's token to pages nobody vetted. Each entry is therefore
refused unless it is one scheme, one host and one port; it is normalised as
browsers serialise an origin (lower-case scheme and host, no default port),
and a request's Origin is then compared with it as a whole string.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

_DEFAULT_PORTS = {"http": 80, "https": 443}
_ORIGIN = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_EXAMPLE = "such as https://app.example.com or http://localhost:3000"


def exact_origin(text: str, what: str) -> str:
    """`text` as a browser would send it in Origin; raise ValueError naming `what` unless it is one exact origin."""
    problem = _problem(text)
    if problem is not None:
        raise ValueError(f"{what}: {text!r} {problem}; list each origin exactly, {_EXAMPLE}")
    match = _ORIGIN.fullmatch(text)
    if match is None:
        raise ValueError(f"{what}: {text!r} is not an origin {_EXAMPLE}")
    scheme = match["scheme"].lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{what}: {text!r} is not an http or https origin")
    host = match["host"].lower()
    if host.startswith("["):
        try:
            # Browsers write an IPv6 host compressed (RFC 5952), which is what ipaddress writes too.
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(f"{what}: {text!r} has a host that is not an IPv6 address") from None
    origin = f"{scheme}://{host}"
    if match["port"] is not None:
        port = int(match["port"])
        if not 0 < port <= 65535:  # noqa: PLR2004 - the largest TCP port
            raise ValueError(f"{what}: {text!r} has a port outside 1-65535")
        if port != _DEFAULT_PORTS[scheme]:
            origin += f":{port}"
    return origin


# The usual mistakes, each with what is wrong with it, checked in this order.
_MISTAKES: tuple[tuple[Callable[[str, str], bool], str], ...] = (
    # Sandboxed iframes, file: pages and some redirects all send "null": it is anybody.
    (
        lambda text, _: text.lower() == "null",
        "is the origin of sandboxed and file: pages, which any site can produce: it cannot be allowed",
    ),
    (lambda text, _: "*" in text, "is a wildcard, which cannot be combined with credentials"),
    (lambda text, _: not text.isascii(), "has non-ASCII characters (write an internationalised host in its xn-- form)"),
    (lambda text, _: "://" not in text, "has no scheme"),
    (lambda _, rest: "@" in rest, "has a user name or password, which an origin never has"),
    (lambda _, rest: "/" in rest, "has a path or a trailing slash, which an origin never has"),
    (lambda _, rest: "?" in rest or "#" in rest, "has a query or fragment, which an origin never has"),
)


def _problem(text: str) -> str | None:
    """Why `text` stands for more or other than one origin, for the usual mistakes; None if none of them."""
    rest = text.partition("://")[2]
    return next((why for test, why in _MISTAKES if test(text, rest)), None)
