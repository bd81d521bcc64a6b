"""Rotating client certificates: new pairs open new channels, calls in flight finish on the old, bad pairs are refused.

Files are replaced the three ways rotation agents do it (rewritten in place,
renamed over, a Kubernetes ..data symlink swap) under a bounded stream of
calls to a real server, whose audit log shows the new caller afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from support.clients import (
    ROTATED_ID,
    AsyncDriver,
    Driver,
    RotatingFiles,
    ScriptedServer,
    fresh_pair,
    identity_response,
    keep,
    peer_spiffe_id,
)
from support.constants import BFF_ID, SERVICE_B
from support.inprocess import RunningServer
from support.logcapture import LeakWatch, LogSink, callers
from support.pki import Pki
from support.waiting import wait_for
from synctoken.client import AsyncTokenClient, CertificateFilesError, SynctokenError, TokenClient
from synctoken.client._channel import Generations
from synctoken.client._credentials import CertificateFiles, TlsFiles
from synctoken_server.dev.pki import KeyPair

MakeClient = Callable[..., Driver]
CHECK = 0.05
"""cert_check_interval in these tests: seconds."""
WORKERS = 3
CALLS_PER_WORKER = 2000
STREAM_SECONDS = 20
Rotate = Callable[[RotatingFiles, KeyPair], None]


def in_place(files: RotatingFiles, pair: KeyPair) -> None:
    """Rewrite both files in place, 0.3 s apart: a poll will see the new certificate with the old key."""
    files.write_in_place(pair, pause=0.3)


def by_rename(files: RotatingFiles, pair: KeyPair) -> None:
    """Rename a new file over each old one, 0.3 s apart: a poll will see a mismatched pair."""
    files.write_by_rename(pair, pause=0.3)


def data_dir_swap(files: RotatingFiles, pair: KeyPair) -> None:
    """Swap Kubernetes' ..data symlink: both files change at once."""
    files.swap_data_dir(pair, generation=2)


ROTATIONS = {"in_place": in_place, "by_rename": by_rename, "data_dir_swap": data_dir_swap}


@pytest.fixture
def rotation() -> str:
    """How the files are replaced: in place, unless a test is parametrized over ROTATIONS."""
    return "in_place"


@pytest.fixture
def files(pki: Pki, tmp_path: Path, rotation: str) -> RotatingFiles:
    """The bff pair, laid out as the rotation under test expects."""
    rotating = RotatingFiles(tmp_path, pki.directory / "ca.pem")
    bff = KeyPair(*(pki.files("bff")[i].read_bytes() for i in (0, 1)))
    if rotation == "data_dir_swap":
        rotating.swap_data_dir(bff, generation=1)
    else:
        rotating.write_in_place(bff)
    return rotating


@dataclass(frozen=True)
class Rotation:
    """One way of replacing the files, ready to replace them with a new pair for ROTATED_ID."""

    name: str
    files: RotatingFiles
    pair: KeyPair

    def __call__(self) -> None:
        ROTATIONS[self.name](self.files, self.pair)

    @property
    def atomic(self) -> bool:
        """Whether both files change at once, so that no poll can see a mismatched pair."""
        return self.name == "data_dir_swap"


@pytest.fixture
def rotate(pki: Pki, files: RotatingFiles, rotation: str) -> Rotation:
    """Replace the files the `rotation` way."""
    return Rotation(rotation, files, fresh_pair(pki))


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The client's warnings about certificate files it did not use."""
    return [r.getMessage() for r in caplog.records if r.name == "synctoken.client" and r.levelno == logging.WARNING]


def check_switch(records: list[str]) -> None:
    """The stream began with the old caller, ended with the new one, and went back to the old only in flight."""
    assert records[0] == BFF_ID
    assert records[-1] == ROTATED_ID
    first_new = records.index(ROTATED_ID)
    # Calls already on the old channel when the new pair arrived: at most one per worker.
    assert records[first_new:].count(BFF_ID) <= WORKERS
    assert records[-10:] == [ROTATED_ID] * 10


@pytest.mark.parametrize("rotation", list(ROTATIONS))
class TestRotationUnderLoad:
    """Replacing the files under a stream of calls fails no call and switches the caller."""

    def test_threads(
        self,
        shared_server: RunningServer,
        rotate: Rotation,
        log_sink: LogSink,
        leak_watch: LeakWatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """TokenClient in three threads: zero failed calls, and the audit log shows the new caller afterwards."""
        identity = f"user-{time.time_ns()}"
        stop = threading.Event()
        failures: list[BaseException] = []

        def stream(client: TokenClient) -> None:
            deadline = time.monotonic() + STREAM_SECONDS
            for _ in range(CALLS_PER_WORKER):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    keep(leak_watch, client.issue_token(identity, service_sid=SERVICE_B))
                except SynctokenError as exc:
                    failures.append(exc)

        with (
            TokenClient(
                f"localhost:{shared_server.port}", cert_check_interval=CHECK, **rotate.files.kwargs()
            ) as client,
            futures.ThreadPoolExecutor(max_workers=WORKERS) as pool,
        ):
            running = [pool.submit(stream, client) for _ in range(WORKERS)]
            wait_for(lambda: len(callers(log_sink, identity)) >= 20)
            rotate()
            wait_for(lambda: callers(log_sink, identity)[-10:] == [ROTATED_ID] * 10)
            stop.set()
            for worker in running:
                worker.result(timeout=STREAM_SECONDS)
            assert len(client._generations) == 1, "the old channel was not closed"
        assert failures == []
        check_switch(callers(log_sink, identity))
        # Rewritten one file at a time, the pair was caught half-way, refused, and not used.
        assert bool(refusals(caplog)) == (not rotate.atomic)

    def test_tasks(
        self,
        shared_server: RunningServer,
        rotate: Rotation,
        log_sink: LogSink,
        leak_watch: LeakWatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """AsyncTokenClient in three tasks: zero failed calls, and the audit log shows the new caller afterwards."""
        identity = f"user-{time.time_ns()}"
        failures: list[BaseException] = []

        async def stream(client: AsyncTokenClient, stop: asyncio.Event) -> None:
            deadline = time.monotonic() + STREAM_SECONDS
            for _ in range(CALLS_PER_WORKER):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    keep(leak_watch, await client.issue_token(identity, service_sid=SERVICE_B))
                except SynctokenError as exc:
                    failures.append(exc)

        async def until(condition: Callable[[], bool]) -> None:
            await asyncio.to_thread(wait_for, condition)

        async def main() -> int:
            stop = asyncio.Event()
            async with AsyncTokenClient(
                f"localhost:{shared_server.port}", cert_check_interval=CHECK, **rotate.files.kwargs()
            ) as client:
                running = [asyncio.ensure_future(stream(client, stop)) for _ in range(WORKERS)]
                await until(lambda: len(callers(log_sink, identity)) >= 20)
                # In a thread: the rotation pauses between files, and the loop must keep calling meanwhile.
                await asyncio.to_thread(rotate)
                await until(lambda: callers(log_sink, identity)[-10:] == [ROTATED_ID] * 10)
                stop.set()
                await asyncio.wait_for(asyncio.gather(*running), timeout=STREAM_SECONDS)
                assert client._generations is not None
                return len(client._generations)

        assert asyncio.run(main()) == 1, "the old channel was not closed"
        assert failures == []
        check_switch(callers(log_sink, identity))
        assert bool(refusals(caplog)) == (not rotate.atomic)


class TestInFlight:
    """A call in flight when the pair changes finishes on the old channel, which is closed after it."""

    @pytest.fixture
    def held(self, pki: Pki) -> tuple[ScriptedServer, threading.Event, threading.Event]:
        """A server that holds bff's first GetCallerIdentity until released, and answers the rest at once."""
        entered, release = threading.Event(), threading.Event()

        def whoami(_request: bytes, context: grpc.ServicerContext) -> bytes:
            caller = peer_spiffe_id(context)
            if caller == BFF_ID and not entered.is_set():
                entered.set()
                release.wait(timeout=10)
            return identity_response(caller)

        return ScriptedServer(pki, {"GetCallerIdentity": whoami}), entered, release

    def test_blocking(
        self,
        pki: Pki,
        files: RotatingFiles,
        held: tuple[ScriptedServer, threading.Event, threading.Event],
    ) -> None:
        """While one call waits on the old channel, new calls present the new certificate; then the old closes."""
        server, entered, release = held
        try:
            with (
                TokenClient(f"localhost:{server.port}", cert_check_interval=CHECK, **files.kwargs()) as client,
                futures.ThreadPoolExecutor(max_workers=1) as pool,
            ):
                old = client._generations.current.channel
                pending = pool.submit(client.whoami)
                assert entered.wait(timeout=10)
                files.write_in_place(fresh_pair(pki))
                time.sleep(CHECK * 2)
                assert client.whoami().caller_id == ROTATED_ID
                assert len(client._generations) == 2, "the old channel closed under its call"
                release.set()
                assert pending.result(timeout=10).caller_id == BFF_ID
                assert len(client._generations) == 1
                raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = old.unary_unary(
                    "/synctoken.v1.TokenService/GetCallerIdentity"
                )
                with pytest.raises(ValueError, match="closed channel"):
                    raw(b"", timeout=1)
        finally:
            release.set()
            server.close()

    def test_asyncio(
        self,
        pki: Pki,
        files: RotatingFiles,
        held: tuple[ScriptedServer, threading.Event, threading.Event],
    ) -> None:
        """The same with tasks: the held call completes after the new channel has served another."""
        server, entered, release = held

        async def main() -> tuple[str, str, int, int]:
            async with AsyncTokenClient(
                f"localhost:{server.port}", cert_check_interval=CHECK, **files.kwargs()
            ) as client:
                pending = asyncio.ensure_future(client.whoami())
                assert await asyncio.to_thread(entered.wait, 10)
                files.write_in_place(fresh_pair(pki))
                await asyncio.sleep(CHECK * 2)
                new = (await client.whoami()).caller_id
                assert client._generations is not None
                during = len(client._generations)
                release.set()
                old = (await asyncio.wait_for(pending, timeout=10)).caller_id
                return new, old, during, len(client._generations)

        try:
            assert asyncio.run(main()) == (ROTATED_ID, BFF_ID, 2, 1)
        finally:
            release.set()
            server.close()


def _encrypted(pair: KeyPair) -> bytes:
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"password"),
    )


# Each defect as (what is written: cert, key), given the current good pair and another good pair.
DEFECTS: dict[str, Callable[[KeyPair, KeyPair], tuple[bytes | None, bytes | None]]] = {
    "mismatched_key": lambda _old, new: (new.cert_pem, None),
    "truncated_cert": lambda _old, new: (new.cert_pem[: len(new.cert_pem) // 2], new.key_pem),
    "empty_key": lambda _old, new: (new.cert_pem, b""),
    "encrypted_key": lambda _old, new: (new.cert_pem, _encrypted(new)),
    "cert_not_pem": lambda _old, new: (b"not a certificate\n", new.key_pem),
}
DEFECT_MESSAGES = {
    "mismatched_key": "the key in {key} does not match the certificate in {cert}",
    "truncated_cert": "{cert} holds no whole PEM certificate",
    "empty_key": "{key} holds no whole PEM private key",
    "encrypted_key": "{key} is encrypted; gRPC needs an unencrypted key",
    "cert_not_pem": "{cert} holds no whole PEM certificate",
}


def write_defect(files: RotatingFiles, defect: str, old: KeyPair, new: KeyPair) -> str:
    """Write a broken pair in place; return the reason the client must give."""
    cert, key = DEFECTS[defect](old, new)
    if cert is not None:
        files.cert_file.write_bytes(cert)
    if key is not None:
        files.key_file.write_bytes(key)
    return DEFECT_MESSAGES[defect].format(cert=files.cert_file, key=files.key_file)


class TestBadPairs:
    """A pair that does not load or does not match is never used: refused at start, kept out on rotation."""

    @pytest.mark.parametrize("defect", list(DEFECTS))
    def test_refused_at_start(self, pki: Pki, files: RotatingFiles, defect: str) -> None:
        """Both clients refuse to start on a bad pair, saying which file and why."""
        bff = KeyPair(files.cert_file.read_bytes(), files.key_file.read_bytes())
        why = write_defect(files, defect, bff, fresh_pair(pki))
        for client_class in (TokenClient, AsyncTokenClient):
            with pytest.raises(CertificateFilesError) as caught:
                client_class("localhost:1", **files.kwargs())
            assert str(caught.value) == why
            assert "PRIVATE KEY" not in str(caught.value)

    @pytest.mark.parametrize(
        ("which", "message"),
        [
            ("ca_file", "{path} holds no whole PEM certificate"),
            ("key_file", "cannot read {path}: No such file or directory"),
        ],
    )
    def test_bad_ca_or_missing_file(self, files: RotatingFiles, which: str, message: str) -> None:
        """A CA file with no certificate, or a missing file, is refused at start by name."""
        paths = dict(files.kwargs())
        path = files.directory / "elsewhere.pem"
        if which == "ca_file":
            path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
        paths[which] = path
        with pytest.raises(CertificateFilesError) as caught:
            TokenClient("localhost:1", **paths)  # type: ignore[arg-type]
        assert str(caught.value) == message.format(path=path)

    @pytest.mark.parametrize("defect", [*DEFECTS, "key_deleted"])
    def test_old_pair_kept(
        self,
        pki: Pki,
        make_client: MakeClient,
        shared_server: RunningServer,
        files: RotatingFiles,
        defect: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """After a bad pair, calls go on with the old certificate, the reason is logged once, and a good pair is then taken."""
        client = make_client(shared_server.port, cert_check_interval=CHECK, **files.kwargs())
        assert client.whoami().caller_id == BFF_ID
        bff = KeyPair(files.cert_file.read_bytes(), files.key_file.read_bytes())
        new = fresh_pair(pki)
        if defect == "key_deleted":
            files.key_file.unlink()
            why = f"cannot stat a file: No such file or directory: {files.key_file}"
        else:
            why = write_defect(files, defect, bff, new)
        for _ in range(3):
            time.sleep(CHECK * 2)
            assert client.whoami().caller_id == BFF_ID
        assert refusals(caplog) == [
            f"client certificate files {files.cert_file} and {files.key_file} not used; the certificate in use stays: {why}"
        ]
        assert "PRIVATE KEY" not in caplog.text
        files.write_in_place(new)
        time.sleep(CHECK * 2)
        assert client.whoami().caller_id == ROTATED_ID


class TestChecking:
    """How often and how cheaply the files are looked at."""

    def test_at_most_every_interval(self, pki: Pki, files: RotatingFiles) -> None:
        """A change is not looked for before the interval has passed on the injected clock, and is taken after."""
        now = [0.0]
        watched = CertificateFiles(TlsFiles(**files.kwargs()), check_interval=10, monotonic=lambda: now[0])
        files.write_in_place(fresh_pair(pki))
        now[0] = 9.9
        assert not watched.due()
        assert watched.poll() is None
        now[0] = 10
        assert watched.due()
        fresh = watched.poll()
        assert fresh is not None
        assert fresh.cert_pem == files.cert_file.read_bytes()
        assert watched.poll() is None  # not due again until 20

    def test_same_bytes_are_not_a_rotation(
        self, make_client: MakeClient, shared_server: RunningServer, files: RotatingFiles
    ) -> None:
        """Files touched or rewritten with the same bytes keep the channel in use."""
        client = make_client(shared_server.port, cert_check_interval=CHECK, **files.kwargs())
        client.whoami()
        inner = client.client if isinstance(client, AsyncDriver) else client
        before = inner._generations.current if inner._generations is not None else None
        for path in (files.cert_file, files.key_file):
            path.write_bytes(path.read_bytes())
            os.utime(path)
        time.sleep(CHECK * 2)
        client.whoami()
        assert inner._generations is not None
        assert inner._generations.current is before

    def test_new_pair_taken_whoever_polled(
        self, pki: Pki, make_client: MakeClient, shared_server: RunningServer, files: RotatingFiles
    ) -> None:
        """A poll whose caller never got to use its result (a task cancelled mid-poll) does not lose the new pair."""
        client = make_client(shared_server.port, cert_check_interval=CHECK, **files.kwargs())
        assert client.whoami().caller_id == BFF_ID
        files.write_in_place(fresh_pair(pki))
        time.sleep(CHECK * 2)
        inner = client.client if isinstance(client, AsyncDriver) else client
        assert inner._tls.poll() is not None  # the new pair, read and dropped
        assert client.whoami().caller_id == ROTATED_ID

    def test_library_configures_no_logging(self) -> None:
        """The client's logger has no handler and no level of its own: the application decides."""
        logger = logging.getLogger("synctoken.client")
        assert (logger.handlers, logger.level, logger.propagate) == ([], logging.NOTSET, True)


class TestGenerations:
    """The bookkeeping behind "calls in flight finish on the old channel", with plain values for channels."""

    def test_idle_old_channel_is_handed_back_at_once(self) -> None:
        """Replacing a channel no call uses returns it, to be closed now."""
        generations = Generations("a")
        assert generations.replace("b") == "a"
        assert (generations.current, len(generations)) == ("b", 1)

    def test_busy_old_channel_waits_for_its_last_call(self) -> None:
        """A replaced channel with calls is kept until the last of them is released."""
        generations = Generations("a")
        first, second = generations.acquire(), generations.acquire()
        assert generations.replace("b") is None
        assert len(generations) == 2
        assert generations.release(first) is None
        assert generations.release(second) == "a"
        assert len(generations) == 1

    def test_current_channel_is_never_handed_back(self) -> None:
        """Releasing a call on the current channel returns nothing to close."""
        generations = Generations("a")
        assert generations.release(generations.acquire()) is None

    def test_release_after_drain(self) -> None:
        """A call that ends after close() took every channel finds nothing left to close."""
        generations = Generations("a")
        call = generations.acquire()
        generations.replace("b")
        assert sorted(generations.drain()) == ["a", "b"]
        assert generations.release(call) is None
