"""`[health] listen`: read by the one loader, refused on another listener's port, restart-only."""

from __future__ import annotations

import pytest

from support.configs import SECRET_ENV, WriteConfig, config_text
from support.pki import Pki
from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import load_config
from synctoken_server.process.reloading import restart_only


def with_tables(pki: Pki, tables: str, listen: str = "127.0.0.1:50051") -> str:
    """The suite's config listening on `listen`, with `tables` appended."""
    return config_text(pki, listen=listen) + "\n" + tables


MESH_ON_15001 = '[mesh]\nlisten = "127.0.0.1:15001"\ntrust_forwarded_client_cert = true\n'


def overlap(port: int, key: str) -> str:
    """The error for a health port that is `key`'s port too."""
    return f"health.listen: port {port} is {key}'s port too: give the plaintext health listener a port of its own"


class TestHealthListen:
    """What [health] holds and what it may not."""

    def test_absent_means_no_listener(self, pki: Pki, write_config: WriteConfig) -> None:
        """Without [health] there is no probe listener, and restart_only says so."""
        config = load_config(write_config(config_text(pki)), environ=SECRET_ENV)
        assert config.health_listen is None
        assert restart_only(config)["health.listen"] == "(off)"

    def test_listen_is_read(self, pki: Pki, write_config: WriteConfig) -> None:
        """The address is kept as written, shown in the effective config, and restart-only."""
        config = load_config(write_config(with_tables(pki, '[health]\nlisten = "0.0.0.0:8081"\n')), environ=SECRET_ENV)
        assert config.health_listen == "0.0.0.0:8081"
        assert dict(config.effective)["health.listen"] == "0.0.0.0:8081"
        assert restart_only(config)["health.listen"] == "0.0.0.0:8081"

    @pytest.mark.parametrize(
        ("tables", "message"),
        [
            ('[health]\nlisten = "8081"\n', "health.listen: '8081' is not host:port (e.g. 0.0.0.0:8081)"),
            ("[health]\n", "health.listen: missing"),
            (
                '[health]\nlisten = "0.0.0.0:8081"\npath = "/healthz"\n',
                "health.path: unknown key; expected one of listen",
            ),
            (
                '[health]\nlisten = "0.0.0.0:50051"\n',
                overlap(50051, "server.listen"),
            ),
            (
                '[metrics]\nlisten = "127.0.0.1:9464"\n[health]\nlisten = "[::]:9464"\n',
                overlap(9464, "metrics.listen"),
            ),
            (
                MESH_ON_15001 + '[health]\nlisten = "0.0.0.0:15001"\n',
                overlap(15001, "mesh.listen"),
            ),
        ],
        ids=["not-host-port", "missing", "unknown-key", "server-port", "metrics-port", "mesh-port"],
    )
    def test_refused(self, pki: Pki, write_config: WriteConfig, tables: str, message: str) -> None:
        """Each mistake is an error naming the file and health.listen (or the unknown key)."""
        path = write_config(with_tables(pki, tables))
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ=SECRET_ENV)
        assert str(caught.value) == f"{path}: {message}"

    def test_port_zero_beside_port_zero(self, pki: Pki, write_config: WriteConfig) -> None:
        """Port 0 is no port yet: :0 for both the server and health is fine for one process."""
        config = load_config(
            write_config(with_tables(pki, '[health]\nlisten = "127.0.0.1:0"\n', listen="127.0.0.1:0")),
            environ=SECRET_ENV,
        )
        assert config.health_listen == "127.0.0.1:0"
