"""One RPC: the config snapshot it sees, the servicer that authenticates and parses, the issuer that mints."""
