"""File writes as deploy tools make them: replaced whole, or rewritten in place."""

from __future__ import annotations

from pathlib import Path


def replace_file(path: Path, data: bytes) -> None:
    """Replace `path` whole, as cert-manager and most deploy tools do: a temp file beside it, then os.replace."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    temp.chmod(0o600)
    temp.replace(path)


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Rewrite `path` in place (truncate, then write): readers may see it empty or half-written meanwhile."""
    with path.open("r+b") as f:
        f.truncate(0)
        f.write(data)
