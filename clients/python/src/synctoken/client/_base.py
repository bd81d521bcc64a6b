"""What TokenClient and AsyncTokenClient share: their arguments, checked once, and how the environment gives them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from synctoken.client._cache import DEFAULT_CACHE_SIZE, Clock, utc_now
from synctoken.client._channel import channel_options, several_addresses
from synctoken.client._connectfailure import ServerCheck
from synctoken.client._credentials import (
    DEFAULT_CHECK_INTERVAL,
    CertificateFiles,
    MissingExtraError,
    TlsFiles,
    TlsSource,
)
from synctoken.client._settings import (
    DEFAULT_TIMEOUT,
    ENV_SERVER_SPIFFE_ID,
    SPIFFE_ENDPOINT_SOCKET,
    Connection,
    WorkloadApi,
    spiffe_trust_domain,
)

DEFAULT_FIRST_SVID_TIMEOUT = 10.0
"""Seconds from_spiffe waits for the Workload API's first X509-SVID (and for its socket) before giving up."""


class ClientBase:
    """The constructors and `from_env` of both clients; each adds its cache and channels in `_start`."""

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
        self._check_arguments(target, server_name, timeout)
        anchors = "the CA file (ca_file, SYNCTOKEN_CA_FILE) must hold the CA that issued it, and it must be valid now"
        self._setup(
            target,
            CertificateFiles(TlsFiles(Path(ca_file), Path(cert_file), Path(key_file)), cert_check_interval),
            tls_name=server_name,
            check=self._describe_check(target, server_name, anchors),
            timeout=timeout,
            cache_size=cache_size,
            clock=clock,
        )

    @classmethod
    def from_spiffe(  # noqa: PLR0913 - the documented keyword arguments
        cls,
        target: str,
        *,
        endpoint_socket: str | None = None,
        server_spiffe_id: str | None = None,
        server_name: str | None = None,
        first_svid_timeout: float = DEFAULT_FIRST_SVID_TIMEOUT,
        timeout: float = DEFAULT_TIMEOUT,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Clock = utc_now,
    ) -> Self:
        """A client whose certificate and trusted CAs come from the SPIFFE Workload API, rotating as it pushes.

        `endpoint_socket` defaults to SPIFFE_ENDPOINT_SOCKET. Waits up to
        `first_svid_timeout` seconds for the first SVID (WorkloadApiTimeoutError,
        a TimeoutError, saying what it saw). The server's certificate must chain
        to the bundle of `server_spiffe_id`'s trust domain (default: this
        workload's own) and carry the target's host name, or `server_name`: see
        the README for what gRPC Python can and cannot check.
        """
        # Built without __init__, which takes files; _setup is what every constructor shares.
        client = cls.__new__(cls)
        cls._check_arguments(target, server_name, timeout)
        socket = endpoint_socket or os.environ.get(SPIFFE_ENDPOINT_SOCKET, "")
        if not socket:
            raise ValueError(f"give endpoint_socket or set {SPIFFE_ENDPOINT_SOCKET}")
        trust_domain = None
        if server_spiffe_id is not None:
            trust_domain = spiffe_trust_domain(server_spiffe_id, "server_spiffe_id")
        if not first_svid_timeout > 0:
            raise ValueError(f"first_svid_timeout must be above 0 seconds, not {first_svid_timeout}")
        try:
            from synctoken.client._workload import WorkloadCertificates  # noqa: PLC0415 - only with the extra
        except ImportError as exc:
            if (exc.name or "").partition(".")[0] not in {"spiffe", "cryptography"}:
                raise
            raise MissingExtraError(
                "certificates from the SPIFFE Workload API need py-spiffe: pip install 'synctoken-api[spiffe]'"
            ) from exc
        source = WorkloadCertificates(socket, server_trust_domain=trust_domain, first_svid_timeout=first_svid_timeout)
        domain = f"trust domain {trust_domain}" if trust_domain else "this workload's own trust domain"
        anchors = (
            f"the Workload API's bundle for {domain} must hold the CA that issued it "
            f"(server_spiffe_id, {ENV_SERVER_SPIFFE_ID}, names the server's trust domain), and it must be valid now"
        )
        try:
            client._setup(  # noqa: SLF001 - this class's own constructor, on its new instance
                target,
                source,
                tls_name=server_name,
                check=cls._describe_check(target, server_name, anchors),
                timeout=timeout,
                cache_size=cache_size,
                clock=clock,
            )
        except BaseException:
            source.close()
            raise
        return client

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cert_check_interval: float = DEFAULT_CHECK_INTERVAL,
        clock: Clock = utc_now,
    ) -> Self:
        """A client set up by the SYNCTOKEN_* variables (see the README); the Workload API's if its socket is set."""
        return cls._from_connection(
            Connection.resolve(os.environ if environ is None else environ),
            cache_size=cache_size,
            cert_check_interval=cert_check_interval,
            clock=clock,
        )

    @classmethod
    def _from_connection(
        cls,
        c: Connection,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cert_check_interval: float = DEFAULT_CHECK_INTERVAL,
        clock: Clock = utc_now,
    ) -> Self:
        """The client a Connection describes: from the Workload API or from files."""
        if isinstance(c.certificates, WorkloadApi):
            return cls.from_spiffe(
                c.target,
                endpoint_socket=c.certificates.endpoint_socket,
                server_spiffe_id=c.server_spiffe_id,
                server_name=c.server_name,
                timeout=c.timeout,
                cache_size=cache_size,
                clock=clock,
            )
        if c.server_spiffe_id is not None:
            raise ValueError(f"{ENV_SERVER_SPIFFE_ID} applies to certificates from the Workload API only")
        return cls(
            c.target,
            ca_file=c.certificates.ca_file,
            cert_file=c.certificates.cert_file,
            key_file=c.certificates.key_file,
            server_name=c.server_name,
            timeout=c.timeout,
            cache_size=cache_size,
            cert_check_interval=cert_check_interval,
            clock=clock,
        )

    @staticmethod
    def _check_arguments(target: str, server_name: str | None, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be above 0 seconds, not {timeout}")
        if several_addresses(target) and not server_name:
            # gRPC would check every replica's certificate against the whole
            # list as one name, and every handshake would fail.
            raise ValueError(
                f"the target {target!r} lists several addresses: give server_name (SYNCTOKEN_SERVER_NAME), "
                "the name every replica's certificate carries"
            )

    @staticmethod
    def _describe_check(target: str, server_name: str | None, anchors: str) -> ServerCheck:
        # The name the server certificate is checked against, as a TLS failure's message names it.
        name = (
            f"{server_name!r} (server_name)"
            if server_name
            else f"in the target {target!r} (server_name, SYNCTOKEN_SERVER_NAME, checks another)"
        )
        return ServerCheck(name, anchors)

    def _setup(  # noqa: PLR0913 - what every constructor settles
        self,
        target: str,
        tls: TlsSource,
        *,
        tls_name: str | None,
        check: ServerCheck,
        timeout: float,
        cache_size: int,
        clock: Clock,
    ) -> None:
        self._target = target
        self._options = channel_options(tls_name)
        self._server_check = check
        self._timeout = timeout
        self._tls = tls
        self._closed = False
        self._start(cache_size, clock)

    def _start(self, cache_size: int, clock: Clock) -> None:
        """Set up the token cache and whatever channels the client opens at once."""
        raise NotImplementedError
