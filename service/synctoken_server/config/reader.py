"""Reading a parsed TOML config: typed values, files and durations, each failure naming the file and key path.

Which keys exist and what they mean is read in `schema.py` and, for the
tables a feature folder consumes, beside it in `twilio.py` ([twilio]),
`limits.py` ([limits] and a caller's rate keys), `metrics.py` ([metrics]),
`audit.py` ([audit]) and `mesh.py` ([mesh]); this is the walking and
checking every key shares. Only config/ imports this (and tomllib):
tests/service/unit/test_layers.py keeps it so.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, TypeVar

from synctoken_server.durations import MAX_TTL_SECONDS, MIN_TTL_SECONDS, format_duration, parse_duration
from synctoken_server.filestamps import FileStamp, Stamps, stamp
from synctoken_server.serveroptions import split_listen

T = TypeVar("T")


class ConfigError(Exception):
    """The config file is unusable; the message names the file and the key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem
        self.files: Stamps = ()
        """The files read (or tried) before the error, stamped: a reloader tries again when one changes."""


class TomlReader:
    """Walks the parsed TOML, keeping the key path for messages."""

    def __init__(self, source: str, base_dir: Path, environ: Mapping[str, str]) -> None:
        self.source = source
        self.base_dir = base_dir
        self.environ = environ
        self.warnings: list[str] = []
        self.files: dict[Path, FileStamp | None] = {}
        """Every file read or tried, with its stamp from just before: what a reloader watches."""
        self.effective: dict[str, object] = {}
        """Every key path read, with the value that applies (defaults included): what check-config prints.

        Filled by the same calls that read the file, so the printout cannot drift from the schema.
        Only names are recorded (file paths, variable names), never what a secret file holds.
        """

    def note(self, path: str, value: object) -> None:
        """Record `value` as the effective value of the key `path` (`callers[0].max_ttl`); "" is no key."""
        if path:
            self.effective[path] = value

    def fail(self, key: str, problem: str) -> ConfigError:
        """The error to raise for `key` (a full key path)."""
        return ConfigError(self.source, key, problem)

    def table(
        self, data: Mapping[str, Any], key: str, allowed: AbstractSet[str], *, required: bool = True
    ) -> dict[str, Any]:
        """The table `key` of `data`, with only `allowed` keys; {} if absent and not required."""
        value = data.get(key)
        if value is None:
            if required:
                raise self.fail(key, "missing table")
            self.effective.setdefault(key, None)
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        self.reject_unknown(value, key, allowed)
        return value

    def reject_unknown(self, value: Mapping[str, Any], key: str, allowed: AbstractSet[str]) -> None:
        """Fail on the first key of `value` (the table at `key`) that is not in `allowed`."""
        for name in value:
            if name not in allowed:
                hint = f"; expected one of {', '.join(sorted(allowed))}" if allowed else ""
                raise self.fail(f"{key}.{name}" if key else name, f"unknown key{hint}")

    def get(self, data: Mapping[str, Any], key: str, name: str, kind: type[T], default: T | None = None) -> T:
        """`data[name]` (in the table at `key`), which must be a `kind`; `default` when absent, if given."""
        value = data.get(name, default)
        path = f"{key}.{name}" if key else name
        if value is None:
            raise self.fail(path, "missing")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(path, f"must be a {_KIND_NAMES.get(kind, kind.__name__)}")
        self.note(path, value)
        return value

    def string_list(self, data: Mapping[str, Any], key: str, name: str) -> tuple[str, ...]:
        """`data[name]`, which must be a list of strings."""
        values = self.get(data, key, name, list)
        if not all(isinstance(v, str) for v in values):
            raise self.fail(f"{key}.{name}", "must be a list of strings")
        return tuple(values)

    def listen(self, data: Mapping[str, Any], key: str, name: str, example: str) -> str:
        """`data[name]`, a `host:port` address to listen on (`example` shows one in the message)."""
        listen = self.get(data, key, name, str)
        if split_listen(listen) is None:
            raise self.fail(f"{key}.{name}", f"{listen!r} is not host:port (e.g. {example})")
        return listen

    def path(self, value: str) -> Path:
        """A path from the config: relative ones are relative to the config file."""
        path = Path(value)
        return path if path.is_absolute() else self.base_dir / path

    def read_file(self, key: str, value: str, *, private: bool = False, echo: bool = True) -> bytes:
        """The file's bytes; `private` files get a warning when others may read them.

        `echo=False` keeps the value out of messages: a secret pasted into the
        wrong key must not be printed back.
        """
        named = f" {value}" if echo else " the file it names"
        path = self.path(value)
        self.files[path] = stamp(path)
        self.note(key, str(path))
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise self.fail(key, f"cannot read{named}: {exc.strerror}") from None
        except ValueError:  # the path has a NUL byte, which no file name can
            raise self.fail(key, f"cannot read{named}: a file name cannot contain a NUL byte") from None
        if private and mode & (stat.S_IRWXG | stat.S_IRWXO):
            # A warning, not an error: Kubernetes secret volumes are 0644 unless told otherwise. The path
            # is named even when `echo` is off: a file was read there, so it is a path, not a pasted secret.
            self.warnings.append(
                f"{self.source}: {key}: {path} is readable by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); make it readable by its owner only (chmod 600)"
            )
        return data

    def duration(self, data: Mapping[str, Any], key: str, name: str, default: str, low: int, high: int) -> int:
        """`data[name]` as a duration in seconds, between `low` and `high`."""
        text = self.get(data, key, name, str, default)
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise self.fail(f"{key}.{name}", str(exc)) from None
        if seconds < low:
            raise self.fail(f"{key}.{name}", f"{text} is below the {format_duration(low)} minimum")
        if seconds > high:
            raise self.fail(f"{key}.{name}", f"{text} is above the {format_duration(high)} limit")
        self.note(f"{key}.{name}", format_duration(seconds))
        return seconds

    def ttl(self, data: Mapping[str, Any], key: str, name: str, default: str) -> int:
        """A token lifetime: a duration within the bounds Twilio and the Sync SDK allow."""
        return self.duration(data, key, name, default, MIN_TTL_SECONDS, MAX_TTL_SECONDS)


def nest(effective: Iterable[tuple[str, object]]) -> dict[str, Any]:
    """Key paths and values (`callers[0].max_ttl`, "4h") as the nested tables and arrays they name.

    A table recorded as absent (None) becomes a table once a key inside it has a value.
    """
    tree: dict[str, Any] = {}
    for path, value in effective:
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = _child(node, part)
        node[leaf] = value
    return tree


def _child(node: dict[str, Any], part: str) -> dict[str, Any]:
    """The table `part` (`server`, or `callers[2]`) of `node`, made if it is not there yet."""
    name, bracket, index = part.partition("[")
    if not bracket:
        if not isinstance(node.get(name), dict):
            node[name] = {}
        return node[name]  # type: ignore[no-any-return]
    items: list[dict[str, Any]] = node.setdefault(name, [])
    position = int(index.removesuffix("]"))
    items.extend({} for _ in range(position + 1 - len(items)))
    return items[position]


_KIND_NAMES: Mapping[type, str] = {str: "string", int: "integer", list: "list", bool: "boolean", dict: "table"}
