"""The kubelet's AtomicWriter, as it updates a ConfigMap or Secret volume: a new folder, then one symlink rename.

Following pkg/volume/util/atomic_writer.go: the payload is written into a
fresh timestamped folder `..<timestamp>`; a symlink `..data_tmp` to it is
renamed over `..data` (the one atomic step); each visible file is a symlink
`name -> ..data/name`, made when first seen; names no longer in the payload
lose their symlink; the old folder is removed last.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path


class AtomicWriter:
    """A ConfigMap-style volume in `directory`, written as the kubelet writes one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._generation = 0

    def write(self, payload: dict[str, bytes]) -> None:
        """Make `payload` (file name to bytes) the volume's contents, in one atomic switch."""
        data = self.directory / "..data"
        old = data.resolve() if data.is_symlink() else None
        self._generation += 1
        # The kubelet's names are timestamps; the generation keeps two writes in one instant apart.
        folder = self.directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self._generation:09d}"
        folder.mkdir(mode=0o755)
        for name, content in payload.items():
            (folder / name).write_bytes(content)
            (folder / name).chmod(0o644)
        staged = self.directory / "..data_tmp"
        staged.symlink_to(folder.name)
        staged.replace(data)
        for name in payload:
            link = self.directory / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        for link in self.directory.iterdir():
            if link.is_symlink() and not link.name.startswith("..") and link.name not in payload:
                link.unlink()
        if old is not None:
            shutil.rmtree(old)
