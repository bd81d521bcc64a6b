"""What a caller may ask for: policy rules, identity characters and patterns, rate limits; no I/O."""
