"""synctoken.v1: generated from proto/synctoken/v1/."""
