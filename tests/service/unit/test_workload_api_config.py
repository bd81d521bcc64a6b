"""[tls] source = "spiffe": the Workload API's keys, read and checked by config/workloadapi.py, shown by check-config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.configs import SECRET_ENV, WriteConfig, config_text, spiffe_tls
from support.pki import Pki
from support.processes import check_config
from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import load_config
from synctoken_server.process.reloading import restart_only

SOCKET = "unix:///run/spire/agent-sockets/api.sock"


def expect_error(path: Path, message: str, environ: dict[str, str] | None = None) -> None:
    """Loading `path` fails with exactly `<path>: <message>`."""
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=SECRET_ENV if environ is None else environ)
    assert str(caught.value) == f"{path}: {message}"


def test_spiffe_source_loads_without_files(pki: Pki, write_config: WriteConfig) -> None:
    """With source = "spiffe" no file is read: the settings are kept, first_svid_timeout defaults to 10s."""
    config = load_config(write_config(config_text(pki, tls=spiffe_tls(SOCKET))), environ=SECRET_ENV)
    assert config.tls is None
    assert config.workload_api is not None
    assert (config.workload_api.endpoint_socket, config.workload_api.first_svid_timeout) == (SOCKET, 10)
    assert config.workload_api.target == "unix:/run/spire/agent-sockets/api.sock"
    assert not any(str(path).endswith(".pem") for path, _stamp in config.files)
    assert restart_only(config)["tls.source"] == "spiffe"
    assert restart_only(config)["tls.endpoint_socket"] == SOCKET


def test_endpoint_from_the_environment(pki: Pki, write_config: WriteConfig) -> None:
    """Without endpoint_socket, SPIFFE_ENDPOINT_SOCKET names the agent; unix:/path is accepted too."""
    path = write_config(config_text(pki, tls=spiffe_tls(first_svid_timeout="1m")))
    config = load_config(path, environ=SECRET_ENV | {"SPIFFE_ENDPOINT_SOCKET": "unix:/tmp/agent.sock"})
    assert config.workload_api is not None
    assert (config.workload_api.target, config.workload_api.first_svid_timeout) == ("unix:/tmp/agent.sock", 60)


def test_files_source_is_the_default(pki: Pki, write_config: WriteConfig) -> None:
    """The suite's config (no source key) serves its files; restart_only shows the Workload API keys unused."""
    config = load_config(write_config(config_text(pki)), environ=SECRET_ENV)
    assert config.tls is not None
    assert config.workload_api is None
    assert restart_only(config)["tls.endpoint_socket"] == "(unused)"


@pytest.mark.parametrize(
    ("tls", "environ", "message"),
    [
        (spiffe_tls(), {}, "tls.endpoint_socket: missing: set it, or SPIFFE_ENDPOINT_SOCKET in the environment"),
        (
            spiffe_tls(),
            {"SPIFFE_ENDPOINT_SOCKET": "tcp://127.0.0.1:8081"},
            (
                "tls.endpoint_socket: 'tcp://127.0.0.1:8081' (from SPIFFE_ENDPOINT_SOCKET) "
                "is not unix:///absolute/path (the Workload API's Unix socket)"
            ),
        ),
        (
            spiffe_tls("unix://agent/api.sock"),
            {},
            "tls.endpoint_socket: 'unix://agent/api.sock' is not unix:///absolute/path (the Workload API's Unix socket)",
        ),
        (
            spiffe_tls("unix:agent.sock"),
            {},
            "tls.endpoint_socket: 'unix:agent.sock' is not unix:///absolute/path (the Workload API's Unix socket)",
        ),
        (spiffe_tls(SOCKET, "0s"), {}, "tls.first_svid_timeout: 0s is below the 1s minimum"),
        (spiffe_tls(SOCKET, "11m"), {}, "tls.first_svid_timeout: 11m is above the 10m limit"),
        ('source = "vault"', {}, "tls.source: 'vault' is not one of files, spiffe"),
        (
            'source = "files"\nendpoint_socket = "unix:///a.sock"',
            {},
            'tls.endpoint_socket: only applies when tls.source is "spiffe"',
        ),
    ],
    ids=[
        "no endpoint",
        "tcp endpoint",
        "unix host form",
        "relative",
        "zero timeout",
        "long timeout",
        "unknown",
        "files",
    ],
)
def test_bad_settings(pki: Pki, write_config: WriteConfig, tls: str, environ: dict[str, str], message: str) -> None:
    """Each bad Workload API setting is refused with the key and what would be right."""
    expect_error(write_config(config_text(pki, tls=tls)), message, SECRET_ENV | environ)


def test_both_sources_at_once_is_an_error(pki: Pki, write_config: WriteConfig) -> None:
    """A file key beside source = "spiffe" is refused, not ignored: nobody should think the file is served."""
    d = pki.directory
    tls = spiffe_tls(SOCKET) + f'\ncert_file = "{d / "server.pem"}"'
    expect_error(
        write_config(config_text(pki, tls=tls)),
        'tls.cert_file: not with tls.source = "spiffe": the certificate and the client CAs come from the Workload '
        "API; remove the file keys, or set tls.source to files",
    )


def test_check_config_shows_the_source(pki: Pki, write_config: WriteConfig) -> None:
    """check-config prints the Workload API's settings and says the certificate comes at start, calling no agent."""
    result = check_config(write_config(config_text(pki, tls=spiffe_tls(SOCKET))))
    assert result.returncode == 0, result.stderr
    dump = json.loads(result.stdout)
    assert dump["tls"]["source"] == "spiffe"
    assert dump["tls"]["endpoint_socket"] == SOCKET
    assert dump["tls"]["first_svid_timeout"] == "10s"
    assert dump["tls"]["cert_file"] is None
    assert dump["certificate"] == {"from": "the SPIFFE Workload API, when the server starts"}
