"""The `synctoken-client` command: issue a token or ask who we are, from a shell, with no proto at hand.

Success prints the response as one JSON object on stdout; a failed call prints
{"code", "reason", "cause", "message", "field_violations"} on stderr and exits 1; bad
usage (flags, missing settings, unusable certificate files) exits 2. A token
only ever goes to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Mapping, Sequence

from synctoken.client._errors import SynctokenError
from synctoken.client._settings import Connection, MissingSettingError, parse_duration, parse_timeout
from synctoken.client._sync import TokenClient
from synctoken.client._types import CallerIdentity, IssuedToken

EXIT_FAILED = 1
EXIT_USAGE = 2

# The flag that stands for each SYNCTOKEN_* variable, for "give --x or set Y".
_FLAGS = {
    "SYNCTOKEN_TARGET": "--target",
    "SYNCTOKEN_CA_FILE": "--ca",
    "SYNCTOKEN_CERT_FILE": "--cert",
    "SYNCTOKEN_KEY_FILE": "--key",
}


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of `synctoken-client`; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        connection = Connection.resolve(
            os.environ if environ is None else environ,
            target=args.target,
            ca_file=args.ca,
            cert_file=args.cert,
            key_file=args.key,
            server_name=args.server_name,
            timeout=args.timeout,
        )
    except MissingSettingError as exc:
        parser.error(f"give {_FLAGS[exc.variable]} or set {exc.variable}")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        client = TokenClient._from_connection(connection)  # noqa: SLF001 - the package's own command
    except ValueError as exc:  # CertificateFilesError, or a target of several addresses without --server-name
        parser.error(str(exc))
    except (TimeoutError, ImportError) as exc:  # no SVID from the Workload API in time, or no py-spiffe
        print(f"synctoken-client: {exc}", file=sys.stderr)
        return EXIT_FAILED
    with client:
        try:
            result = _run(client, args)
        except SynctokenError as exc:
            print(json.dumps(_error_json(exc)), file=sys.stderr)
            return EXIT_FAILED
    print(json.dumps(result))
    return 0


def run() -> None:
    """Console-script wrapper: exit with main's status."""
    sys.exit(main())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synctoken-client",
        description="Call synctoken over mutual TLS. Connection flags default to the SYNCTOKEN_* variables.",
    )
    parser.add_argument("--target", help="host:port of synctoken (SYNCTOKEN_TARGET)")
    parser.add_argument("--ca", metavar="FILE", help="CA certificates to trust (SYNCTOKEN_CA_FILE)")
    parser.add_argument("--cert", metavar="FILE", help="client certificate chain (SYNCTOKEN_CERT_FILE)")
    parser.add_argument("--key", metavar="FILE", help="client private key (SYNCTOKEN_KEY_FILE)")
    parser.add_argument(
        "--server-name", metavar="NAME", help="TLS name to verify, if not the target's host (SYNCTOKEN_SERVER_NAME)"
    )
    parser.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS", help="deadline of the call (SYNCTOKEN_TIMEOUT, default 5)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    issue = commands.add_parser("issue", help="mint a token; prints it with its times as JSON")
    issue.add_argument("--identity", required=True, help="the end user the token is for")
    issue.add_argument("--service", default="", metavar="IS...", help="Sync service SID (default: the policy's)")
    issue.add_argument("--endpoint-id", default="", help="endpoint (device) id")
    issue.add_argument("--ttl", type=_duration, help="lifetime such as 10m or 1h30m (default: the policy's)")
    issue.add_argument("--region", default="", help="Twilio region such as ie1")
    issue.add_argument("--validate-only", action="store_true", help="check everything, sign nothing")
    commands.add_parser("whoami", help="who the server believes we are, and our policy")
    return parser


def _run(client: TokenClient, args: argparse.Namespace) -> dict[str, object]:
    if args.command == "whoami":
        return _identity_json(client.whoami())
    token = client.issue_token(
        args.identity,
        service_sid=args.service,
        endpoint_id=args.endpoint_id,
        ttl=args.ttl,
        region=args.region,
        validate_only=args.validate_only,
    )
    return _token_json(token)


def _seconds(text: str) -> float:
    try:
        return parse_timeout(text, "--timeout")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> dt.timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _timestamp(moment: dt.datetime) -> str:
    # RFC 3339 in UTC with a Z, as grpcurl prints google.protobuf.Timestamp.
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _seconds_json(duration: dt.timedelta) -> str:
    # As grpcurl prints google.protobuf.Duration.
    return f"{int(duration.total_seconds())}s"


def _token_json(token: IssuedToken) -> dict[str, object]:
    printed: dict[str, object] = {
        "token": token.token,
        "identity": token.identity,
        "issued_at": _timestamp(token.issued_at),
        "expires_at": _timestamp(token.expires_at),
        "refresh_after": _timestamp(token.refresh_after),
        "token_id": token.token_id,
    }
    # As grpcurl prints proto3 JSON: empty fields (token and token_id of a validate_only call) are left out.
    return {key: value for key, value in printed.items() if value != ""}


def _identity_json(identity: CallerIdentity) -> dict[str, object]:
    policy = identity.policy
    return {
        "caller_id": identity.caller_id,
        "policy": None
        if policy is None
        else {
            "matched_caller": policy.matched_caller,
            "sync_service_sids": list(policy.sync_service_sids),
            "default_sync_service_sid": policy.default_sync_service_sid,
            "identity_pattern": policy.identity_pattern,
            "allowed_identity_characters": policy.allowed_identity_characters,
            "default_ttl": _seconds_json(policy.default_ttl),
            "max_ttl": _seconds_json(policy.max_ttl),
        },
    }


def _error_json(error: SynctokenError) -> dict[str, object]:
    # Built from the error's fields only: an error never carries a token.
    return {
        "code": error.code.name,
        "reason": error.reason,
        # Why the call never reached synctoken (e.g. "tls_handshake_failed"), or None.
        "cause": error.cause,
        "message": error.message,
        "field_violations": [{"field": f, "description": d} for f, d in error.field_violations],
    }
