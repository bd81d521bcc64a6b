"""Files `synctoken dev` writes: whole or not at all, and private from their first byte when they are keys.

A run stopped part-way (Ctrl-C, a full disk, a kill) must not leave an empty or
half-written key, certificate or secret that the next run takes as its own.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def put(path: Path, data: bytes, mode: int, *, replace: bool = True) -> None:
    """Make `path` a file holding `data`, created with `mode`, in one step: nobody ever sees it partly written.

    The bytes go to a temporary file beside `path` (same folder, so the same
    file system), reach the disk (fsync), and only then take `path`'s name.
    `replace` False: refuse (FileExistsError) rather than replace a file that is there.
    An OSError names `path`, not the temporary file.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            if replace:
                temp.replace(path)
            else:
                os.link(temp, path)  # unlike a rename, refuses to replace a file that appeared meanwhile
        finally:
            temp.unlink(missing_ok=True)
        _sync_folder(path.parent)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None


def _sync_folder(folder: Path) -> None:
    # The rename is the folder's change: on the disk too before the run goes on to use the file.
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
