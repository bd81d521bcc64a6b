"""The `synctoken-bff` console script: warnings are silenced before any library is imported."""

from synctoken._quiet import quiet_library_warnings

quiet_library_warnings()

from synctoken_bff._cli import run  # noqa: E402  (after the filter, on purpose)

__all__ = ["run"]
