"""One server process and its lifecycle: the gRPC server, its TLS credentials, start, reload, drain, workers."""
