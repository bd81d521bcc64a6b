"""What TokenClient and AsyncTokenClient share: their arguments, checked once, and how the environment gives them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from synctoken.client._cache import DEFAULT_CACHE_SIZE, Clock, utc_now
from synctoken.client._channel import channel_options, several_addresses
from synctoken.client._credentials import DEFAULT_CHECK_INTERVAL, CertificateFiles, TlsFiles
from synctoken.client._settings import DEFAULT_TIMEOUT, Connection


class ClientBase:
    """The constructor and `from_env` of both clients; each adds its cache and channels in `_start`."""

    def __init__(  # noqa: PLR0913 - the documented keyword arguments
        self,
        target: str,
        *,
        ca_file: str | os.PathLike[str],
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cert_check_interval: float = DEFAULT_CHECK_INTERVAL,
        clock: Clock = utc_now,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be above 0 seconds, not {timeout}")
        if several_addresses(target) and not server_name:
            # gRPC would check every replica's certificate against the whole
            # list as one name, and every handshake would fail.
            raise ValueError(
                f"the target {target!r} lists several addresses: give server_name (SYNCTOKEN_SERVER_NAME), "
                "the name every replica's certificate carries"
            )
        self._target = target
        self._options = channel_options(server_name)
        # The name the server certificate is checked against, as a TLS failure's message names it.
        self._checked_name = (
            f"{server_name!r} (server_name)"
            if server_name
            else f"in the target {target!r} (server_name, SYNCTOKEN_SERVER_NAME, checks another)"
        )
        self._timeout = timeout
        self._files = CertificateFiles(TlsFiles(Path(ca_file), Path(cert_file), Path(key_file)), cert_check_interval)
        self._closed = False
        self._start(cache_size, clock)

    def _start(self, cache_size: int, clock: Clock) -> None:
        """Set up the token cache and whatever channels the client opens at once."""
        raise NotImplementedError

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cert_check_interval: float = DEFAULT_CHECK_INTERVAL,
        clock: Clock = utc_now,
    ) -> Self:
        """A client set up by SYNCTOKEN_TARGET, _CA_FILE, _CERT_FILE, _KEY_FILE, _SERVER_NAME and _TIMEOUT."""
        c = Connection.resolve(os.environ if environ is None else environ)
        return cls(
            c.target,
            **c.client_files(),
            cache_size=cache_size,
            cert_check_interval=cert_check_interval,
            clock=clock,
        )
