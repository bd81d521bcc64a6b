"""Cheap change detection for the files synctoken reads: one stat per file, never a read.

A stamp follows symlinks, so a Kubernetes secret volume (files that are
symlinks into a `..data` directory swapped whole) shows a new inode when it
is updated; `os.replace` gives a new inode; an in-place rewrite changes the
size or the modification time. A missing file has the stamp None, so its
appearance is a change too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

FileStamp = tuple[int, int, int, int, int]
"""Device, inode, size, modification and status-change times (ns)."""

Stamps = tuple[tuple[Path, FileStamp | None], ...]
"""Files and their stamps, taken before each was read."""


def stamp(path: Path) -> FileStamp | None:
    """The stamp of `path` now, or None if it cannot be stat'ed."""
    try:
        st = path.stat()
    except (OSError, ValueError):  # ValueError: a NUL in the name, refused by the loader with its key
        return None
    # The change time moves on every write and rename, also when a write
    # lands within the modification time's granularity and keeps the size.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def restamp(paths: Iterable[Path]) -> Stamps:
    """The stamps of `paths` now."""
    return tuple((path, stamp(path)) for path in paths)


def changed(stamps: Stamps) -> frozenset[Path]:
    """Which of the stamped files are not as they were."""
    return frozenset(path for path, before in stamps if stamp(path) != before)
