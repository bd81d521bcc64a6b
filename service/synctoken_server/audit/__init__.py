"""What gets written: the audit record of each decision, the log set-up and its line sink, hashed identities."""
