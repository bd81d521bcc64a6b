"""Where global rate limits are kept: Redis, with bounded calls behind a breaker; imported only when configured."""
