"""The README's examples work as written: the reference config, the rotations, the Python client's examples, its CLI."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import jwt
import pytest
from cryptography import x509

from support.configs import WriteConfig
from support.constants import API_KEY_SID, BFF_ID, ROOT, SYNCTOKEN
from support.inprocess import RunningServer
from support.logcapture import LeakWatch
from support.pki import Pki, presented_certificate
from support.processes import Process, free_port
from support.readme import README, blocks, section
from support.workloadagent import SvidSet, WorkloadAgent, issue_svid
from synctoken_server.config.reader import nest
from synctoken_server.config.schema import SCHEMA, Config, key_paths, load_config
from synctoken_server.dev import devenv
from synctoken_server.process.reloading import restart_only

WORKLOAD_API_SECTION = "### Client certificates from the SPIFFE Workload API"


def reference_config() -> str:
    """The TOML block under "Config reference"."""
    section = README.read_text(encoding="utf-8").split("### Config reference", 1)[1]
    match = re.search(r"```toml\n(.*?)```", section, re.DOTALL)
    assert match is not None, "no toml block under Config reference"
    return match.group(1)


class TestReferenceConfig:
    """The reference config is a real one."""

    def test_check_config_accepts_it(self, pki: Pki, tmp_path: Path, write_config: WriteConfig) -> None:
        """With the files it names in place, check-config accepts the reference config as printed."""
        shutil.copy(pki.directory / "server.pem", tmp_path / "server.pem")
        shutil.copy(pki.directory / "server-key.pem", tmp_path / "server-key.pem")
        shutil.copy(pki.directory / "ca.pem", tmp_path / "clients-ca.pem")
        secret = tmp_path / "twilio_api_secret"
        secret.write_text("readme-secret\n", encoding="utf-8")
        secret.chmod(0o600)
        audit_key = tmp_path / "audit-hmac-key"
        audit_key.write_text("readme-audit-key-" + "a" * 32 + "\n", encoding="utf-8")
        audit_key.chmod(0o600)
        path = write_config(reference_config())
        result = subprocess.run(
            [SYNCTOKEN, "check-config", str(path)], capture_output=True, text=True, timeout=30, check=False, env={}
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert "readme-secret" not in result.stdout
        assert "readme-audit-key" not in result.stdout


@pytest.fixture
def reference_dir(pki: Pki, tmp_path: Path) -> Path:
    """A folder holding the files the reference config names."""
    shutil.copy(pki.directory / "server.pem", tmp_path / "server.pem")
    shutil.copy(pki.directory / "server-key.pem", tmp_path / "server-key.pem")
    shutil.copy(pki.directory / "ca.pem", tmp_path / "clients-ca.pem")
    for name, text in (("twilio_api_secret", "readme-secret\n"), ("audit-hmac-key", "k" * 64 + "\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        (tmp_path / name).chmod(0o600)
    return tmp_path


def load_reference(folder: Path, replace: tuple[tuple[str, str], ...] = (), append: str = "") -> Config:
    """The reference config, edited (each `old` must be there) and loaded as check-config loads it."""
    text = reference_config()
    for old, new in replace:
        assert old in text
        text = text.replace(old, new)
    path = folder / "synctoken.toml"
    path.write_text(text + append, encoding="utf-8")
    return load_config(path, environ={"OTHER_SECRET": "other-secret", "THE_SECRET": "the-secret"})


def dumped_paths(tree: object, prefix: str = "") -> set[str]:
    """The key paths check-config prints (`callers[].max_ttl`): arrays of tables as `[]`, other values as leaves."""
    if isinstance(tree, dict):
        return {path for key, value in tree.items() for path in dumped_paths(value, f"{prefix}{key}.")}
    if isinstance(tree, list) and tree and all(isinstance(item, dict) for item in tree):
        return {path for item in tree for path in dumped_paths(item, prefix.removesuffix(".") + "[].")}
    return {prefix.removesuffix(".")}


_SINGLE_KEY = re.compile(r"\[\[twilio\.api_keys\]\].*?(?=\n\[)", re.DOTALL)


class TestConfigSchema:
    """check-config's dump, the README's reference and the restart-only keys agree with the one schema."""

    def test_dump_has_every_key(self, reference_dir: Path) -> None:
        """Loaded with every key set (both [twilio] spellings), check-config's dump names each key of the schema."""
        group = f"socket_group = {os.getegid()}"
        variants = [
            load_reference(
                reference_dir,
                (('# socket_group = "envoy"', group),),
                f'\n[[twilio.api_keys]]\nsid = "SK{"9" * 32}"\nsecret_env = "OTHER_SECRET"\n',
            ),
            *(
                load_reference(reference_dir, ((block, f'api_key = "{API_KEY_SID}"\n{secret}\n'),))
                for block in _SINGLE_KEY.findall(reference_config())
                for secret in ('api_secret_file = "twilio_api_secret"', 'api_secret_env = "THE_SECRET"')
            ),
        ]
        assert len(variants) == 3
        dumped = set().union(*(dumped_paths(nest(config.effective)) for config in variants))
        assert set(key_paths()) - dumped == set()

    def test_the_check_sees_a_key_the_dump_lacks(self, reference_dir: Path) -> None:
        """A key that is read but never recorded (as a reader using data.get would) is missing from the dump."""
        config = load_reference(reference_dir)
        effective = tuple((path, value) for path, value in config.effective if path != "server.grace")
        assert "server.grace" in set(key_paths()) - dumped_paths(nest(effective))

    def test_reference_names_every_key(self) -> None:
        """The README's config reference shows every table and names every key the schema allows."""
        block = reference_config()
        parsed = dumped_paths(tomllib.loads(re.sub(r"^# (\w+ = )", r"\1", block, flags=re.MULTILINE)))
        text = section("### Config reference")
        for table in SCHEMA:
            name = table.removesuffix("[]")
            assert f"\n[[{name}]]" in block if table.endswith("[]") else f"\n[{name}]" in f"\n{block}", table
        # The keys a file sets one way or the other ([twilio]'s single key, secret_env) are named in the prose.
        unnamed = [path for path in key_paths() if path not in parsed and f"{path.rpartition('.')[2]} = " not in text]
        assert unnamed == []

    def test_restart_only_keys_are_schema_keys(self, reference_dir: Path) -> None:
        """The keys a reload cannot change are keys of the schema, and the README lists each as needing a restart."""
        keys = list(restart_only(load_reference(reference_dir)))
        assert set(keys) <= set(key_paths())
        needs_restart = section("### What needs a restart")
        reload_table = section("### What reloads, and how")
        for key in keys:
            assert f"`{key}`" in needs_restart, key
            assert f"`{key}`" in reload_table, key


@pytest.fixture
def dev_like(pki: Pki, tmp_path: Path) -> Path:
    """A folder laid out like .synctoken-dev/, holding the suite's CA and bff's certificate and key."""
    folder = tmp_path / "dev"
    folder.mkdir()
    cert, key = pki.files("bff")
    shutil.copy(pki.directory / "ca.pem", folder / "ca.pem")
    shutil.copy(cert, folder / "client.pem")
    shutil.copy(key, folder / "client-key.pem")
    return folder


class TestPythonClient:
    """The client examples run as printed, against a real server, with the walk-through's variables."""

    def test_python_examples(self, dev_like: Path, shared_server: RunningServer) -> None:
        """Each Python block under "Calling synctoken from Python" runs and prints what its comments say."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCTOKEN_")} | {
            "SYNCTOKEN_TARGET": f"localhost:{shared_server.port}",
            "SYNCTOKEN_CA_FILE": str(dev_like / "ca.pem"),
            "SYNCTOKEN_CERT_FILE": str(dev_like / "client.pem"),
            "SYNCTOKEN_KEY_FILE": str(dev_like / "client-key.pem"),
        }
        outputs = []
        files_part = section("## Calling synctoken from Python").split(f"{WORKLOAD_API_SECTION}\n")[0]
        for code in blocks(files_part, "python"):
            result = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False, env=env
            )
            assert result.returncode == 0, result.stderr
            outputs.append(result.stdout)
        assert len(outputs) == 2
        assert "SERVICE_NOT_ALLOWED {'callerId': 'spiffe://example.org/ns/web/sa/bff'" in outputs[0]
        assert outputs[1] == f"{BFF_ID}\n1\n"

    def test_workload_api_example(self, pki: Pki, shared_server: RunningServer, workload_agent: WorkloadAgent) -> None:
        """The from_spiffe example runs with our server and the stand-in agent, and prints the SVID's SPIFFE ID."""
        [code] = blocks(section(WORKLOAD_API_SECTION), "python")
        code = code.replace('"synctoken.prod.svc.cluster.local:50051"', f'"127.0.0.1:{shared_server.port}"')
        code = code.replace('"unix:///run/spire/sockets/agent.sock"', f'"{workload_agent.address}"')
        workload_agent.start(SvidSet((issue_svid(pki.ca, BFF_ID),)))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCTOKEN_", "SPIFFE_"))}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False, env=env
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{BFF_ID}\n"

    def test_cli_walk_through(
        self, dev_like: Path, shared_server: RunningServer, leak_watch: LeakWatch, tmp_path: Path
    ) -> None:
        """The synctoken-client commands work as typed, with our port, files and venv."""
        [script] = blocks(section("### synctoken-client walk-through"), "sh")
        script = (
            script.replace("localhost:50051", f"localhost:{shared_server.port}")
            .replace(".synctoken-dev/", f"{dev_like}/")
            .replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        )
        result = subprocess.run(
            [shutil.which("bash") or "/bin/bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        leak_watch.tokens.update(str(p["token"]) for p in printed if p.get("token"))
        assert [sorted(p) for p in printed] == [
            ["caller_id", "policy"],
            ["expires_at", "identity", "issued_at", "refresh_after", "token", "token_id"],
            ["expires_at", "identity", "issued_at", "refresh_after"],  # --validate-only: nothing signed
        ]
        assert result.stdout.endswith("exit 1\n")
        assert json.loads(result.stderr)["field_violations"][0]["field"] == "identity"


class TestBrowserProviderExample:
    """The page's lines under "The browser token provider" use the package's real exports."""

    def test_lines_bundle(self, tmp_path: Path) -> None:
        """esbuild bundles the printed lines with the package as a checkout installs it (nothing built) and twilio-sync."""
        [code] = blocks(section("### The browser token provider"), "js")
        assert "tokenProvider(" in code
        assert "bindSyncClient(provider, SyncClient" in code
        # A page's project with the package installed from a fresh checkout: package.json and src/, not dist/
        # (built, and ignored by git), resolved through package.json's exports as a bundler does.
        installed = tmp_path / "node_modules/@synctoken/browser"
        shutil.copytree(ROOT / "clients/browser/src", installed / "src")
        shutil.copyfile(ROOT / "clients/browser/package.json", installed / "package.json")
        (tmp_path / "node_modules/twilio-sync").symlink_to(ROOT / "node_modules/twilio-sync")
        (tmp_path / "page.js").write_text(code, encoding="utf-8")
        result = subprocess.run(
            [
                str(ROOT / "node_modules/.bin/esbuild"),
                "page.js",
                "--bundle",
                "--format=esm",
                "--target=es2022",
                "--platform=browser",
                "--log-level=warning",
                "--outfile=out/page.js",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert "function tokenProvider" in (tmp_path / "out/page.js").read_text(encoding="utf-8")


class TestBffExample:
    """The BFF example under "Serving tokens to browsers" builds an app that serves the plugged-in user."""

    def test_authenticate_example(self, dev_like: Path, shared_server: RunningServer) -> None:
        """The printed create_app call, driven by Starlette's TestClient, mints for the header's user."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCTOKEN_", "BFF_"))} | {
            "SYNCTOKEN_TARGET": f"localhost:{shared_server.port}",
            "SYNCTOKEN_CA_FILE": str(dev_like / "ca.pem"),
            "SYNCTOKEN_CERT_FILE": str(dev_like / "client.pem"),
            "SYNCTOKEN_KEY_FILE": str(dev_like / "client-key.pem"),
        }
        [code] = blocks(section("## Serving tokens to browsers"), "python")
        drive = (
            "\nfrom starlette.testclient import TestClient\n"
            "with TestClient(app) as http:\n"
            "    for user in ('alice', None):\n"
            "        r = http.get('/token', headers={'x-authenticated-user': user} if user else {})\n"
            "        print(r.status_code, r.json().get('identity'))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code + drive], capture_output=True, text=True, timeout=60, check=False, env=env
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "200 alice\n401 None\n"


BASH = shutil.which("bash") or "/bin/bash"
VENV_BIN = f"{Path(sys.executable).parent}/"


def as_here(script: str, port: int) -> str:
    """A README script with our venv and the server's port in place of .venv/bin/ and 50051."""
    return script.replace(".venv/bin/", VENV_BIN).replace("localhost:50051", f"localhost:{port}")


def run_script(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a README script with bash, stopping at the first failing command."""
    return subprocess.run(
        [BASH, "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env=clean_env(),
    )


def clean_env() -> dict[str, str]:
    """This environment minus anything that would change what the README's commands do."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "SYNCTOKEN_", "GRPC_"))}


class ScriptProcess(Process):
    """A server started by a README line, through bash, which execs it (so SIGTERM reaches synctoken itself)."""

    def __init__(self, script: str, cwd: Path, watch: LeakWatch) -> None:
        self.stdout_path = cwd / "stdout.jsonl"
        self.stderr_path = cwd / "stderr.txt"
        watch.log_files += [self.stdout_path, self.stderr_path]
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen([BASH, "-euo", "pipefail", "-c", script], stdout=out, stderr=err, cwd=cwd)


def issued_tokens(output: str, watch: LeakWatch) -> list[dict[str, str]]:
    """The IssueToken responses grpcurl printed (JSON objects over several lines), each token watched for leaks."""
    responses = [json.loads(m) for m in re.findall(r"^\{\n.*?^\}$", output, re.DOTALL | re.MULTILINE)]
    watch.tokens.update(r["token"] for r in responses if "token" in r)
    return responses


class TestTryTheReferenceConfig:
    """The "To try it" steps under Config reference make every file the example names, and it serves."""

    def test_steps_serve_the_example(self, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]) -> None:
        """Run as printed (with free ports for 50051, 8081 and 9464), the example serves IssueToken to grpcurl."""
        devenv.prepare(tmp_path / ".synctoken-dev", free_port(), environ={})  # what `make dev` made
        setup, call = blocks(section("### Config reference").split("```toml", 1)[0], "sh")
        *steps, serve_line = setup.strip().splitlines()
        assert " serve --config " in serve_line
        # The one step the reader does by hand: save the example where the serve line reads it.
        config = shlex.split(serve_line.split("--config ", 1)[1], comments=True)[0]
        port, metrics_port, health_port = free_port(), free_port(), free_port()
        example = tmp_path / "example.toml"
        example.write_text(
            reference_config()
            .replace(":50051", f":{port}")
            .replace(":9464", f":{metrics_port}")
            .replace(":8081", f":{health_port}"),
            encoding="utf-8",
        )
        # One shell, as the reader's terminal: the steps, the example saved where serve reads it, then serve.
        script = as_here("\n".join([*steps, f"cp {example} {config}", f"exec {serve_line}"]), port)
        server = ScriptProcess(script, tmp_path, leak_watch)
        processes.append(server)
        server.wait_for_records("server.started")
        assert "PRIVATE KEY" not in server.stderr_path.read_text()
        try_dir = tmp_path / ".synctoken-dev" / "try"
        secrets = [(try_dir / name).read_text().strip() for name in ("twilio_api_secret", "audit-hmac-key")]
        leak_watch.secrets.update(secrets)
        result = run_script(as_here(call, port), tmp_path)
        assert result.returncode == 0, result.stderr
        [response] = issued_tokens(result.stdout, leak_watch)
        claims = jwt.decode(response["token"], secrets[0], algorithms=["HS256"])
        assert claims["grants"] == {
            "identity": "alice",
            "data_sync": {"service_sid": "IS0123456789abcdef0123456789abcdef"},
        }
        [decision] = server.wait_for_records("token.decision")
        assert (decision["caller_id"], decision["outcome"]) == ("spiffe://example.org/ns/web/sa/bff", "issued")
        assert decision["identity"].startswith("h:")  # the audit key is in use
        assert (try_dir / "mesh.sock").is_socket()
        # Mesh mode's grpcurl line reaches the same example over its socket, as the sidecar would.
        [mesh_call] = blocks(section("#### Mesh mode"), "sh")
        result = run_script(as_here(mesh_call, port), tmp_path)
        assert result.returncode == 0, result.stderr
        [response] = issued_tokens(result.stdout, leak_watch)
        assert jwt.decode(response["token"], secrets[0], algorithms=["HS256"])["grants"]["identity"] == "alice"
        mesh_decision = server.wait_for_records("token.decision", 2)[1]
        assert (mesh_decision["caller_id"], mesh_decision["outcome"]) == (
            "spiffe://example.org/ns/web/sa/bff",
            "issued",
        )
        # The probe listener's grpcurl line reaches the example's plaintext health port, and says SERVING.
        [health_call] = blocks(section("#### Health probes"), "sh")
        result = run_script(as_here(health_call.replace(":8081", f":{health_port}"), port), tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "status: SERVING"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=10) as scrape:
            assert b"synctoken_tokens_issued_total" in scrape.read()
        checked = subprocess.run(
            [SYNCTOKEN, "check-config", str(try_dir / "synctoken.toml")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=clean_env(),
        )
        assert (checked.returncode, checked.stderr) == (0, "")
        assert server.terminate() == 0


def peer_serial(port: int, ca: Path) -> str:
    """The serial of the certificate the server presents on a new connection."""
    return f"{presented_certificate(port, ca.read_text(), host='localhost').serial_number:X}"


def handshake_fails(port: int, ca: Path, cert: Path, key: Path) -> bool:
    """Whether the server refuses `cert` in the TLS handshake of a new connection.

    TLS 1.2: in TLS 1.3 the client's handshake is over before the server has
    judged its certificate, so a refusal would show only at the first read.
    """
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("localhost", port), timeout=10) as raw:
        try:
            context.wrap_socket(raw, server_hostname="localhost").close()
        except ssl.SSLError:
            return True
    return False


class TestRotationWalkThroughs:
    """Under "Operating synctoken", the dev server's rotations run as printed, one after the other."""

    def test_rotations(self, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]) -> None:
        """Server certificate, client CA, then a client's certificate: calls succeed throughout; the old CA ends."""
        port = free_port()
        dev = Process(["dev", "--port", str(port)], tmp_path, leak_watch, clean_env())  # `make dev`, on a free port
        processes.append(dev)
        dev.wait_for_stderr("Try:")
        folder = tmp_path / ".synctoken-dev"
        leak_watch.secrets.add((folder / devenv.SECRET_FILE).read_text().strip())
        ca = folder / devenv.CA_FILE
        old_serial = peer_serial(port, ca)
        old_client = folder / "old-client.pem", folder / "old-client-key.pem"
        shutil.copy(folder / devenv.CLIENT_CERT, old_client[0])
        shutil.copy(folder / devenv.CLIENT_KEY, old_client[1])

        [server_steps] = blocks(section("### Rotating the server certificate"), "sh")
        result = run_script(as_here(server_steps, port), tmp_path)
        assert result.returncode == 0, result.stderr
        assert len(issued_tokens(result.stdout, leak_watch)) == 1
        new_serial = f"{x509.load_pem_x509_certificate((folder / devenv.SERVER_CERT).read_bytes()).serial_number:X}"
        assert peer_serial(port, ca) == new_serial != old_serial
        assert dev.wait_for_records("tls.reloaded")[-1]["serial"] == new_serial

        assert not handshake_fails(port, ca, *old_client)  # the check below means something
        [ca_steps] = blocks(section("### Rotating the client CA"), "sh")
        result = run_script(as_here(ca_steps, port), tmp_path)
        assert result.returncode == 0, result.stderr
        callers = [json.loads(line)["caller_id"] for line in result.stdout.splitlines() if line.startswith("{")]
        assert callers == [devenv.DEV_CLIENT_ID] * 3  # old and new, then new alone
        assert result.stdout.endswith("old CA refused: exit 1\n")
        assert [r["client_cas"] for r in dev.records() if r["event"] == "tls.reloaded"][-2:] == [2, 1]
        # On a new connection, the old CA's client is refused in the handshake itself, the new CA's is not.
        new_client = folder / "next-client" / devenv.CLIENT_CERT, folder / "next-client" / devenv.CLIENT_KEY
        assert (handshake_fails(port, ca, *old_client), handshake_fails(port, ca, *new_client)) == (True, False)

        [client_steps] = blocks(section("### Rotating a client's certificate"), "sh")
        result = run_script(as_here(client_steps, port), tmp_path)
        assert result.returncode == 0, result.stderr
        assert len(issued_tokens(result.stdout, leak_watch)) == 1
        next_ca = x509.load_pem_x509_certificate((folder / "next-ca" / "ca.pem").read_bytes())
        x509.load_pem_x509_certificate((folder / devenv.CLIENT_CERT).read_bytes()).verify_directly_issued_by(next_ca)
        # The command dev prints works again, and so does a restarted dev server.
        line = dev.wait_for_stderr("Try:").split("Try:\n", 1)[1].strip()
        assert len(issued_tokens(run_script(line, tmp_path).stdout, leak_watch)) == 1
        assert dev.terminate() == 0
