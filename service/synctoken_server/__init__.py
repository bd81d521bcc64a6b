"""synctoken: a gRPC service that mints Twilio Access Tokens for mTLS-authenticated backends.

Its folders, and the modules at this top level, are layers: each line below
imports only from the lines under it, and the names on one line import none
of each other (tests/service/unit/test_layers.py keeps it so):

    command
    cli
    process, dev
    rpc
    config
    tokens, authn, audit, limitstore
    policy
    metrics, tracing
    boundedhttp
    durations, filestamps, errors, serveroptions
"""

import os

__version__ = "0.1.0"

# gRPC's core prints its own plain-text lines (handshake failures, bind errors)
# on stderr beside our JSON logs; it reads this once, when grpc is first
# imported, so the default is set here, before any module of ours imports it.
# GRPC_VERBOSITY=INFO (or DEBUG) in the environment raises it again.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
