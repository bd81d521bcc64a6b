"""Generated stubs for the synctoken gRPC API; see proto/ for the source."""
