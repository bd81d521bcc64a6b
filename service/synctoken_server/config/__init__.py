"""The only code that reads TOML: the config file parsed, validated and frozen into typed settings."""
