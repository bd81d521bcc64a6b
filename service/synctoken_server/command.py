"""The `synctoken` console script: warnings are silenced before any library is imported.

Workers are spawned processes that run the console script again as their main module, so
they import this module, and are silenced, before they import anything else.
"""

from synctoken._quiet import quiet_library_warnings

quiet_library_warnings()

from synctoken_server.cli import run  # noqa: E402  (after the filter, on purpose)

__all__ = ["run"]
