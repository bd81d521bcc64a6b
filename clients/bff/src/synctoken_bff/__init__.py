"""A backend-for-frontend for synctoken: browsers GET /token, the BFF asks synctoken over mutual TLS.

```python
from synctoken.client import AsyncTokenClient
from synctoken_bff import create_app

app = create_app(AsyncTokenClient.from_env(), authenticate=my_login_check)
```
"""

from synctoken_bff._addresslimit import NewIdentityLimit
from synctoken_bff._app import Authenticate, TokenSource, create_app
from synctoken_bff._session import AnonymousSessions
from synctoken_bff._settings import Settings

__all__ = ["AnonymousSessions", "Authenticate", "NewIdentityLimit", "Settings", "TokenSource", "create_app"]
