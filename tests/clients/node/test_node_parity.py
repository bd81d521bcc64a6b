"""synctoken's tokens against those of Twilio's official Node helper library, for the same inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from google.protobuf import duration_pb2

from support.constants import ACCOUNT_SID, API_KEY_SID, API_SECRET, ROOT, SERVICE_B
from support.inprocess import Client
from synctoken.v1 import token_service_pb2 as pb

MINT_SCRIPT = Path(__file__).parent / "mint_access_token.js"
NODE_MODULES = ROOT / "node_modules"


def node_token(inputs: dict[str, object]) -> str:
    """A token minted by the `twilio` npm package (installed by `make test`) from `inputs`."""
    node = shutil.which("node")
    assert node is not None, "node is required: the README's quick start installs it"
    assert (NODE_MODULES / "twilio").is_dir(), "run `npm ci` (make test does) to install the twilio npm package"
    result = subprocess.run(
        [node, str(MINT_SCRIPT)],
        input=json.dumps(inputs),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"NODE_PATH": str(NODE_MODULES), "PATH": str(Path(node).parent)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("region", "endpoint_id"),
    [("", ""), ("ie1", "device-7")],
)
def test_same_token_as_node_helper(connect: Callable[[str | None], Client], region: str, endpoint_id: str) -> None:
    """Header and claims match the Node library's token; only its clock-derived claims and `iat` differ."""
    request = pb.IssueTokenRequest(
        identity="bob@example.com",
        sync=pb.SyncGrant(service_sid=SERVICE_B, endpoint_id=endpoint_id),
        ttl=duration_pb2.Duration(seconds=900),
        region=region,
    )
    response = connect("bff").issue(request)
    ours_header = jwt.get_unverified_header(response.token)
    ours = jwt.decode(response.token, API_SECRET, algorithms=["HS256"])
    theirs_token = node_token(
        {
            "accountSid": ACCOUNT_SID,
            "keySid": API_KEY_SID,
            "secret": API_SECRET,
            "identity": "bob@example.com",
            "ttl": 900,
            "nbf": response.issued_at.seconds,
            "region": region,
            "serviceSid": SERVICE_B,
            "endpointId": endpoint_id,
        }
    )
    theirs_header = jwt.get_unverified_header(theirs_token)
    theirs = jwt.decode(theirs_token, API_SECRET, algorithms=["HS256"])
    assert ours_header == theirs_header
    # jsonwebtoken (under the Node library) adds `iat`; the Python library does not. Both then
    # stamp jti and exp from their own clock, so compare those by construction, not by value.
    iat = theirs.pop("iat")
    assert theirs.pop("jti") == f"{API_KEY_SID}-{iat}"
    assert theirs.pop("exp") == iat + 900
    assert ours.pop("jti").startswith(f"{API_KEY_SID}-")
    assert ours.pop("exp") == response.issued_at.seconds + 900
    assert ours == theirs
