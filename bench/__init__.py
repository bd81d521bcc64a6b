"""synctoken's benchmark harness: `python -m bench [--quick]`."""
