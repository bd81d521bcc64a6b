"""The config file's schema, parsed, validated and frozen; and the server's TLS files it names, checked as one set."""
