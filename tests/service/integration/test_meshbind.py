"""The mesh listener is reachable by the sidecar only: loopback by what it binds, a socket with an explicit mode."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from support.configs import SECRET_ENV, WriteConfig, config_text
from support.constants import BFF_ID, SYNCTOKEN
from support.inprocess import ServerHarness
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import check_config, free_port
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.authn.mesh import MeshListener
from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import Config, load_config
from synctoken_server.process.server import TokenServer

ALICE = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant())
NOBODY = 65534
"""nobody/nogroup: another user, for the tests that connect as one."""
_SIOCGIFADDR = 0x8915


def mesh_table(listen: str, extra: str = "") -> str:
    """A [mesh] table listening on `listen`."""
    return f'[mesh]\nlisten = "{listen}"\ntrust_forwarded_client_cert = true\n{extra}'


def load(write_config: WriteConfig, pki: Pki, mesh: str, listen: str = "127.0.0.1:0") -> Config:
    """The suite's config with this [mesh] table."""
    return load_config(write_config(f"{mesh}\n{config_text(pki, listen=listen)}"), environ=SECRET_ENV)


def refusal(write_config: WriteConfig, pki: Pki, mesh: str, listen: str = "127.0.0.1:0") -> str:
    """The loader's message for this [mesh] table, without the file name."""
    with pytest.raises(ConfigError) as caught:
        load(write_config, pki, mesh, listen)
    return caught.value.problem


def host_addresses() -> list[str]:
    """This machine's IPv4 and IPv6 addresses that are not loopback (link-local ones left out)."""
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()))
            except OSError:
                continue
            found.append(socket.inet_ntoa(answer[20:24]))
    with Path("/proc/net/if_inet6").open() as table:
        for line in table:
            hex_address, *_ = line.split()
            found.append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hex_address)))
    return [a for a in found if not a.startswith(("127.", "fe80:")) and a != "::1"]


def bracketed(address: str) -> str:
    """An IP address as the host of host:port."""
    return f"[{address}]" if ":" in address else address


class TestLoopbackByResolution:
    """A host:port is judged by the addresses its host resolves to, never by how it is spelled."""

    @pytest.mark.parametrize(
        ("host", "resolved"),
        [
            ("0.0.0.0", "0.0.0.0"),  # noqa: S104 - the point: it must be refused
            ("[::]", "::"),
            ("0", "0.0.0.0"),  # noqa: S104 - inet_aton's shorthand: a name that does not look like every interface
            ("[::ffff:0:0]", "::ffff:0.0.0.0"),  # v4 every-interface, mapped into v6
        ],
    )
    def test_wildcards_refused(self, pki: Pki, write_config: WriteConfig, host: str, resolved: str) -> None:
        """Every spelling of every interface is refused, naming what it resolved to."""
        problem = refusal(write_config, pki, mesh_table(f"{host}:50052"))
        assert problem == (
            f"'{host}:50052' resolves to {resolved}, which is not loopback: only the sidecar may reach "
            "the mesh listener (use 127.0.0.1, [::1] or unix:<path>)"
        )

    def test_host_addresses_refused(self, pki: Pki, write_config: WriteConfig) -> None:
        """The machine's own non-loopback addresses (v4 and v6) are refused."""
        addresses = host_addresses()
        if not addresses:
            pytest.skip("this machine has no non-loopback address")
        for address in addresses:
            problem = refusal(write_config, pki, mesh_table(f"{bracketed(address)}:50052"))
            assert f"resolves to {address}, which is not loopback" in problem

    def test_unresolvable_refused(self, pki: Pki, write_config: WriteConfig) -> None:
        """A name that does not resolve is refused at load, not at bind."""
        problem = refusal(write_config, pki, mesh_table("no-such-host.invalid:50052"))
        assert problem.startswith("no-such-host.invalid does not resolve: ")

    @pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost", "[::ffff:7f00:1]", socket.gethostname()])
    def test_loopback_names_serve(self, harness: ServerHarness, pki: Pki, host: str, leak_watch: LeakWatch) -> None:
        """A name is accepted if it resolves to loopback only (the machine's own name may), and is served there."""
        resolved = {str(info[4][0]) for info in socket.getaddrinfo(host.strip("[]"), 0, proto=socket.IPPROTO_TCP)}
        if host == socket.gethostname() and not all(a.startswith("127.") or a == "::1" for a in resolved):
            pytest.skip(f"{host} resolves to {resolved}")
        server = harness.start(f"{mesh_table(f'{host}:0')}\n{config_text(pki)}")
        bound = server._server.mesh_addresses
        assert bound
        for address in bound:
            host_part = address.rpartition(":")[0].strip("[]")
            assert host_part.startswith("127.") or host_part == "::1", bound
            with grpc.insecure_channel(address) as channel:
                response = token_service_pb2_grpc.TokenServiceStub(channel).IssueToken(
                    ALICE, metadata=(("x-forwarded-client-cert", f"URI={BFF_ID}"),), timeout=10
                )
            leak_watch.tokens.add(response.token)
            assert response.identity == "alice"

    def test_check_config_refuses(self, pki: Pki, write_config: WriteConfig) -> None:
        """check-config says the same as serve would."""
        result = check_config(write_config(f"{mesh_table('[::]:50052')}\n{config_text(pki)}"))
        assert result.returncode == 2
        assert "mesh.listen: '[::]:50052' resolves to ::, which is not loopback" in result.stderr


def build_server(config: Config) -> None:
    """Make a TokenServer as running does: inside an event loop (older grpcio will not make one for it)."""

    async def build() -> None:
        TokenServer(config)

    asyncio.run(build())


class TestBoundAddresses:
    """After binding, the sockets the kernel holds are checked, whatever the loader resolved."""

    def test_non_loopback_bind_refused(self, pki: Pki, write_config: WriteConfig) -> None:
        """A listener that would bind every interface (a resolver that changed its mind) is refused at start."""
        config = load(write_config, pki, mesh_table("127.0.0.1:0"))
        changed = dataclasses.replace(config, mesh=MeshListener("localhost:0", ("0.0.0.0:0",)))
        with pytest.raises(OSError, match=r"cannot listen on localhost:0: bound \[::\]:\d+, which is not loopback"):
            build_server(changed)

    def test_tls_port_refused(self, pki: Pki, write_config: WriteConfig) -> None:
        """A mesh socket that shares the mTLS listener's port on the other family is refused at start."""
        port = free_port()
        config = load(write_config, pki, mesh_table("127.0.0.1:0"), listen=f"127.0.0.1:{port}")
        changed = dataclasses.replace(config, mesh=MeshListener(f"[::1]:{port}", (f"[::1]:{port}",)))
        with pytest.raises(OSError, match=rf"bound \[::1\]:{port}, which is the mTLS listener's port"):
            build_server(changed)


class TestOverlap:
    """A mesh port is never the mTLS listener's port, in either address family."""

    @pytest.mark.parametrize(
        ("server_host", "mesh_host"),
        [
            ("127.0.0.1", "localhost"),
            ("127.0.0.1", "[::1]"),
            ("127.0.0.1", "127.0.0.1"),
            ("[::1]", "127.0.0.1"),
            ("localhost", "[::1]"),
            ("0.0.0.0", "127.0.0.1"),  # noqa: S104
            ("[::]", "localhost"),
        ],
    )
    def test_same_port_refused(self, pki: Pki, write_config: WriteConfig, server_host: str, mesh_host: str) -> None:
        """Same port, any family: refused at load, naming the port."""
        port = free_port()
        problem = refusal(write_config, pki, mesh_table(f"{mesh_host}:{port}"), listen=f"{server_host}:{port}")
        assert problem == f"port {port} is server.listen's port too: give the plaintext mesh listener a port of its own"

    def test_other_port_serves(self, harness: ServerHarness, pki: Pki) -> None:
        """Beside a fixed mTLS port, another mesh port on the same host is fine."""
        port = free_port()
        mesh_port = free_port()
        text = f"{mesh_table(f'localhost:{mesh_port}')}\n{config_text(pki, listen=f'127.0.0.1:{port}')}"
        server = harness.start(text)
        assert server.port == port
        assert set(server._server.mesh_addresses) <= {f"127.0.0.1:{mesh_port}", f"[::1]:{mesh_port}"}


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory short enough for sun_path, searchable by other users (so that only the socket's mode stops them)."""
    with tempfile.TemporaryDirectory(prefix="st-mesh-", dir="/tmp") as directory:
        Path(directory).chmod(0o755)
        yield Path(directory)


@pytest.fixture
def umask_000() -> Iterator[None]:
    """The process umask at 000 meanwhile (the in-process servers bind under it)."""
    previous = os.umask(0)
    yield
    os.umask(previous)


_CONNECT = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"


def connects_as(path: Path, uid: int, gid: int, groups: tuple[int, ...] = ()) -> bool:
    """Whether a process of another user (and these groups) can connect to the socket at `path`."""
    group_args = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    result = subprocess.run(
        [SETPRIV, f"--reuid={uid}", f"--regid={gid}", *group_args, sys.executable, "-c", _CONNECT, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 or "PermissionError" in result.stderr, result.stderr
    return result.returncode == 0


SETPRIV = shutil.which("setpriv") or "setpriv"
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="connecting as another user needs root and setpriv"
)


@pytest.mark.usefixtures("umask_000")
class TestSocketMode:
    """The socket's mode is explicit, whatever the umask."""

    def test_owner_only(self, harness: ServerHarness, pki: Pki, socket_dir: Path) -> None:
        """Under umask 000 the socket is 0600, and still serves its owner."""
        path = socket_dir / "mesh.sock"
        harness.start(f"{mesh_table(f'unix:{path}')}\n{config_text(pki)}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))

    @needs_root
    def test_other_user_cannot_connect(self, harness: ServerHarness, pki: Pki, socket_dir: Path) -> None:
        """Another local user cannot connect (and so cannot name any caller)."""
        path = socket_dir / "mesh.sock"
        harness.start(f"{mesh_table(f'unix:{path}')}\n{config_text(pki)}")
        assert not connects_as(path, NOBODY, NOBODY)

    @needs_root
    @pytest.mark.parametrize("group", [NOBODY, '"nogroup"'])
    def test_group(self, harness: ServerHarness, pki: Pki, socket_dir: Path, group: object) -> None:
        """With socket_group (a gid or a name) the socket is 0660 of that group: its members connect, no one else."""
        path = socket_dir / "mesh.sock"
        harness.start(f"{mesh_table(f'unix:{path}', f'socket_group = {group}')}\n{config_text(pki)}")
        status = path.stat()
        assert (stat.S_IMODE(status.st_mode), status.st_gid) == (0o660, NOBODY)
        assert connects_as(path, NOBODY, NOBODY, groups=(NOBODY,))
        assert not connects_as(path, NOBODY + 1, NOBODY + 1)


class TestSocketGroupConfig:
    """socket_group is checked at load."""

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            ('socket_group = "no-such-group-here"', "mesh.socket_group: no group named 'no-such-group-here'"),
            ("socket_group = true", "mesh.socket_group: must be a group name or a gid"),
            ("socket_group = 1.5", "mesh.socket_group: must be a group name or a gid"),
        ],
    )
    def test_invalid(self, pki: Pki, write_config: WriteConfig, socket_dir: Path, extra: str, message: str) -> None:
        """An unknown group or a value of the wrong type names the key."""
        with pytest.raises(ConfigError) as caught:
            load(write_config, pki, mesh_table(f"unix:{socket_dir / 'mesh.sock'}", extra))
        assert f"{caught.value.key}: {caught.value.problem}" == message

    def test_only_for_unix(self, pki: Pki, write_config: WriteConfig) -> None:
        """A loopback port has no file to give a group."""
        problem = refusal(write_config, pki, mesh_table("127.0.0.1:0", "socket_group = 0"))
        assert problem == "applies to a unix:<path> listener only"


class TestSocketDirectory:
    """Where the socket goes: the directory must exist, and only its owner should be able to replace the socket."""

    def test_missing_directory(self, pki: Pki, write_config: WriteConfig, socket_dir: Path) -> None:
        """check-config and serve say the directory does not exist (not gRPC's "in use or not available")."""
        missing = socket_dir / "absent"
        path = write_config(f"{mesh_table(f'unix:{missing}/mesh.sock')}\n{config_text(pki)}")
        expected = f"mesh.listen: directory {missing} does not exist"
        checked = check_config(path)
        assert (checked.returncode, expected in checked.stderr) == (2, True), checked.stderr
        served = subprocess.run(
            [SYNCTOKEN, "serve", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=os.environ | SECRET_ENV,
        )
        assert (served.returncode, expected in served.stderr) == (2, True), served.stderr

    @pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o733])
    def test_writable_directory_warns(self, pki: Pki, write_config: WriteConfig, socket_dir: Path, mode: int) -> None:
        """A directory others may write to (no sticky bit) is named in a warning, in check-config too."""
        socket_dir.chmod(mode)
        path = write_config(f"{mesh_table(f'unix:{socket_dir}/mesh.sock')}\n{config_text(pki)}")
        expected = (
            f"{path}: mesh.listen: directory {socket_dir} is writable by group or others (mode {mode:04o}): "
            "they can replace the socket with their own and receive the sidecar's calls; make it writable by "
            "its owner only (chmod go-w), or set the sticky bit"
        )
        assert load_config(path, environ=SECRET_ENV).warnings == (expected,)
        checked = check_config(path)
        assert (checked.returncode, checked.stderr) == (0, f"synctoken: warning: {expected}\n")

    @pytest.mark.parametrize("mode", [0o755, 0o700, 0o1777])
    def test_private_or_sticky_directory(
        self, pki: Pki, write_config: WriteConfig, socket_dir: Path, mode: int
    ) -> None:
        """Owner-only writes, or the sticky bit (as /tmp), draw no warning."""
        socket_dir.chmod(mode)
        path = write_config(f"{mesh_table(f'unix:{socket_dir}/mesh.sock')}\n{config_text(pki)}")
        assert load_config(path, environ=SECRET_ENV).warnings == ()

    @needs_root
    def test_directory_of_another_user_warns(self, pki: Pki, write_config: WriteConfig, socket_dir: Path) -> None:
        """A directory another user owns can have the socket replaced by them: warned, naming the owner."""
        os.chown(socket_dir, NOBODY, NOBODY)
        path = write_config(f"{mesh_table(f'unix:{socket_dir}/mesh.sock')}\n{config_text(pki)}")
        [warning] = load_config(path, environ=SECRET_ENV).warnings
        assert f"directory {socket_dir} belongs to uid {NOBODY}, who can replace the socket" in warning
