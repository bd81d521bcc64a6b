"""A typed Python client for synctoken: mTLS calls with deadlines and retries, a token cache, rotating certificates.

```python
from synctoken.client import TokenClient

with TokenClient.from_env() as client:
    token = client.get_token("alice")
```
"""

from synctoken.client._aio import AsyncTokenClient
from synctoken.client._connectfailure import Cause
from synctoken.client._credentials import CertificateFilesError, MissingExtraError, WorkloadApiTimeoutError
from synctoken.client._errors import (
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    SynctokenError,
    Unauthenticated,
    Unavailable,
)
from synctoken.client._settings import parse_duration
from synctoken.client._sync import TokenClient
from synctoken.client._types import CallerIdentity, CallerPolicy, IssuedToken

__all__ = [
    "AsyncTokenClient",
    "CallerIdentity",
    "CallerPolicy",
    "Cause",
    "CertificateFilesError",
    "InvalidRequest",
    "IssuedToken",
    "MissingExtraError",
    "PermissionDenied",
    "RateLimited",
    "SynctokenError",
    "TokenClient",
    "Unauthenticated",
    "Unavailable",
    "WorkloadApiTimeoutError",
    "parse_duration",
]
