"""synctoken: a gRPC service that mints Twilio Access Tokens for mTLS-authenticated backends."""

import os

__version__ = "0.1.0"

# gRPC's core prints its own plain-text lines (handshake failures, bind errors)
# on stderr beside our JSON logs; it reads this once, when grpc is first
# imported, so the default is set here, before any module of ours imports it.
# GRPC_VERBOSITY=INFO (or DEBUG) in the environment raises it again.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
