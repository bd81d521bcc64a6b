"""Python warnings off in synctoken's commands, unless the user asked for them.

A deprecation inside a dependency (cryptography deprecating DSA, say, on spiffe's import) is
the project's to fix, not the operator's to read: the commands print only their own lines.
`-W` or `PYTHONWARNINGS` (both land in sys.warnoptions) bring them back. The test suite
keeps turning warnings into errors, so the project still sees every one.
"""

from __future__ import annotations

import sys
import warnings


def quiet_library_warnings() -> None:
    """Ignore every Python warning unless -W or PYTHONWARNINGS said otherwise."""
    if not sys.warnoptions:
        warnings.simplefilter("ignore")
