"""The `synctoken` command: serve, check-config, audit-hash, dev."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from synctoken_server import __version__
from synctoken_server.audit import logs
from synctoken_server.config.audit import hasher_from_config, hasher_from_key_file
from synctoken_server.config.reader import ConfigError, nest
from synctoken_server.config.schema import Config
from synctoken_server.dev import devenv, devissue
from synctoken_server.durations import MAX_TTL_SECONDS, format_duration, format_utc
from synctoken_server.process import running
from synctoken_server.process import workers as workers_module
from synctoken_server.process.running import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_START

DEV_PORT = 50051


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `synctoken` command."""
    parser = argparse.ArgumentParser(
        prog="synctoken", description="Mint Twilio Access Tokens for mTLS-authenticated backends."
    )
    parser.add_argument("--version", action="version", version=f"synctoken {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server with a config file")
    serve.add_argument("--config", type=Path, required=True, help="path to the TOML config")
    serve.add_argument(
        "--workers", type=_positive, default=1, help="server processes sharing the port (default 1; use the core count)"
    )
    check = commands.add_parser("check-config", help="validate a config file and print the effective policy")
    check.add_argument("config", type=Path)
    audit_hash = commands.add_parser(
        "audit-hash", help="print an identity as the private audit log writes it, to find that user's records"
    )
    key_source = audit_hash.add_mutually_exclusive_group(required=True)
    key_source.add_argument("--config", type=Path, help="the server's config (only its [audit] table is read)")
    key_source.add_argument("--key-file", type=Path, help="the key file itself")
    audit_hash.add_argument("--identity", required=True, help="the end-user identity, as the caller sent it")
    dev = commands.add_parser("dev", help="run on localhost with throwaway certificates and credentials")
    dev.add_argument("--dir", type=Path, default=Path(".synctoken-dev"), help="where to keep the dev files")
    # None, not 50051: `dev --port N issue` must be told --port does not apply, not ignore it.
    dev.add_argument("--port", type=int, default=None, help=f"the port to serve on (default {DEV_PORT})")
    _add_dev_issue(dev)
    args = parser.parse_args(argv)

    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "audit-hash":
        return _audit_hash(args.config, args.key_file, args.identity)
    if args.command == "dev":
        if args.dev_command == "issue":
            return _dev_issue(args)
        return _dev(args.dir, DEV_PORT if args.port is None else args.port)
    return _serve(args.config, workers=args.workers)


def _dev(directory: Path, port: int) -> int:
    if not _port_free(port):
        # Before writing anything: the folder may belong to a dev server
        # already running there, which would reload whatever is written.
        print(f"synctoken dev: cannot listen on localhost:{port}: address in use", file=sys.stderr)
        return EXIT_START
    try:
        env = devenv.prepare(directory, port)
    except devenv.DevSetupError as exc:
        print(f"synctoken dev: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # a full disk, a folder not ours: each file is written whole or not at all
        print(f"synctoken dev: cannot prepare {exc.filename or directory}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    if env.secret_remade:
        secret = env.directory / devenv.SECRET_FILE
        _say(f"synctoken dev: {secret} held no dev secret (empty, or cut short): made a new one")
    _say(f"synctoken dev: throwaway CA, certificates and config in {env.directory}/")
    if env.real_credentials:
        _say("Using TWILIO_ACCOUNT_SID, TWILIO_API_KEY and TWILIO_API_SECRET: tokens are real.")
    else:
        _say(
            "Using dev credentials: tokens are well-formed, but Twilio will refuse them. "
            "Set TWILIO_ACCOUNT_SID, TWILIO_API_KEY and TWILIO_API_SECRET for real ones."
        )
    return _serve(env.config_path, on_ready=lambda bound: _say(f"Try:\n  {env.grpcurl_command(bound)}"))


def _add_dev_issue(dev: argparse.ArgumentParser) -> None:
    issue = dev.add_subparsers(dest="dev_command", title="more certificates").add_parser(
        "issue",
        allow_abbrev=False,  # --ca is not short for --ca-dir
        help="issue another certificate from the dev CA (or from --ca-dir), or a new CA",
        description="Issue a certificate from the dev CA, for another caller or to try a rotation. "
        "Writes client.pem and client-key.pem (server.pem and server-key.pem with --server, "
        "ca.pem and ca-key.pem with --ca) into --out; keys are readable by you alone.",
    )
    issue.add_argument("--spiffe-id", help="a client certificate (X509-SVID) with this SPIFFE ID")
    issue.add_argument(
        "--dns-name",
        action="append",
        default=[],
        help="a client certificate with this DNS name; with --server, a name it serves (repeat for more)",
    )
    kind = issue.add_mutually_exclusive_group()
    kind.add_argument("--server", action="store_true", help="a server certificate, for --dns-name and --ip")
    kind.add_argument("--ca", action="store_true", help="a new CA, e.g. to rotate the client CA")
    issue.add_argument("--ip", action="append", default=[], help="with --server, an IP address it serves")
    issue.add_argument("--out", type=Path, required=True, help="the folder to write to (made if missing)")
    issue.add_argument("--force", action="store_true", help="replace the files if --out has them already")
    # SUPPRESS: `synctoken dev --dir D issue` keeps D unless issue is given a --dir of its own.
    issue.add_argument(
        "--dir", type=Path, default=argparse.SUPPRESS, help="the dev folder, whose CA signs (default .synctoken-dev)"
    )
    issue.add_argument("--ca-dir", type=Path, help="sign with the CA in this folder instead (one --ca wrote)")


def _dev_issue(args: argparse.Namespace) -> int:
    kind = devissue.Kind.CA if args.ca else devissue.Kind.SERVER if args.server else devissue.Kind.CLIENT
    wanted = devissue.Wanted(kind, args.spiffe_id, tuple(args.dns_name), tuple(args.ip))
    ca_dir: Path = args.ca_dir or args.dir
    try:
        if args.port is not None:
            raise devissue.IssueError("--port is for serving (synctoken dev --port N): issue serves nothing")  # noqa: TRY301
        if args.ca and args.ca_dir is not None:
            raise devissue.IssueError("--ca makes a self-signed CA: --ca-dir does not apply")  # noqa: TRY301
        issued = devissue.issue(wanted, ca_dir, args.out, force=args.force)
    except devissue.IssueError as exc:
        print(f"synctoken dev issue: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    what = {
        devissue.Kind.CA: "a new CA",
        devissue.Kind.SERVER: f"a server certificate from the CA in {ca_dir}",
        devissue.Kind.CLIENT: f"a client certificate from the CA in {ca_dir}",
    }[kind]
    names = ", ".join(n for n in (args.spiffe_id, *args.dns_name, *args.ip) if n)
    print(f"synctoken dev issue: {what}{f' for {names}' if names else ''}", file=sys.stderr)
    print(f"  serial {issued.serial}, valid until {issued.not_after:%Y-%m-%d %H:%M} UTC", file=sys.stderr)
    for path, note in ((issued.cert, ""), (issued.key, " (readable by you alone)")):
        replaced = " (replaced)" if path in issued.replaced else ""
        print(f"  {path}{note}{replaced}", file=sys.stderr)
    return 0


def _port_free(port: int) -> bool:
    if port == 0:
        return True
    with socket.socket() as probe:
        try:
            probe.bind(("localhost", port))
        except OSError:
            return False
    return True


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"{text} is not a positive number"
        raise argparse.ArgumentTypeError(msg)
    return value


def _say(text: str) -> None:
    # Humans read stderr; stdout carries only the JSON log lines.
    print(text, file=sys.stderr, flush=True)


def _check_config(path: Path) -> int:
    config = running.load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    for warning in (*config.warnings, *_inactive_key_warnings(config)):
        print(f"synctoken: warning: {warning}", file=sys.stderr)
    effective = nest(config.effective)
    # What the files hold, beside where they are: nothing secret, and what an operator checks first.
    if config.tls is not None:
        effective["certificate"] = {
            "serial": config.tls.serial,
            "not_after": format_utc(config.tls.not_after),
            "client_cas": config.tls.client_cas,
        }
    else:  # not asked for here: check-config checks the file, it does not act as the server
        effective["certificate"] = {"from": "the SPIFFE Workload API, when the server starts"}
    print(json.dumps(effective, indent=2))
    return 0


def _audit_hash(config: Path | None, key_file: Path | None, identity: str) -> int:
    try:
        hasher = hasher_from_config(config) if config is not None else None
        if key_file is not None:
            hasher = hasher_from_key_file(key_file)
    except ConfigError as exc:
        running.report_config_error(exc)
        return EXIT_CONFIG
    if hasher is None:
        print(
            f"synctoken: {config} has no [audit] identity_hash_key_file: identities are logged as they are",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    print(hasher(identity))
    return 0


def _inactive_key_warnings(config: Config) -> list[str]:
    # Nothing is persisted, so this process cannot know whether an inactive key is a new one waiting
    # to sign or an old one that signed until recently: only the running servers' key ledgers know
    # (their twilio.key_rotated lines). Say what is true in both cases.
    max_ttl = format_duration(config.policy.longest_ttl or MAX_TTL_SECONDS)
    return [
        f"twilio.api_keys: {sid} is listed but not active. If it is a new key waiting for active = true, "
        f"nothing is needed. If it signed before, tokens it signed may still be live: delete it at Twilio only "
        f"max_ttl ({max_ttl}) after it stopped signing, or after previous_key_tokens_live_until in the servers' "
        "twilio.key_rotated line"
        for sid in config.inactive_api_keys
    ]


def _serve(path: Path, on_ready: Callable[[int], None] | None = None, workers: int = 1) -> int:
    running.ignore_sighup_until_ready()
    logs.configure()
    config = running.load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    if workers == 1:
        return running.run_one(config, path, on_ready=on_ready)
    # Said like every other config error: the file, the key, the problem.
    error = None
    if config.listen.endswith(":0"):
        error = ConfigError(str(path), "server.listen", "--workers needs a fixed port, not :0")
    elif config.health_listen is not None and config.health_listen.endswith(":0"):
        # Each worker would get a port of its own, and a probe would reach one worker of N.
        error = ConfigError(str(path), "health.listen", "--workers needs a fixed port, not :0")
    elif config.mesh is not None:
        # Each worker would bind the same socket path, and only the last one would be reached.
        error = ConfigError(str(path), "mesh", "not yet supported with --workers: run one worker per sidecar")
    if error is not None:
        running.report_config_error(error)
        return EXIT_CONFIG
    return workers_module.run_workers(path, config, workers)


def run() -> None:
    """Console-script wrapper: exit with main's status.

    Ctrl-C before a server's loop takes SIGINT over (while the config is read,
    say) ends with 130, as a shell reports an interrupt, not with a traceback.
    """
    try:
        status = main()
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    sys.exit(status)
