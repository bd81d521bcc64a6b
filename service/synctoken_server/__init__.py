"""synctoken: a gRPC service that mints Twilio Access Tokens for mTLS-authenticated backends."""

__version__ = "0.1.0"
