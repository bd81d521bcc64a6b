"""The service's shape, read from the source with `ast`, nothing imported: folders import one way; class names are unique."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.constants import ROOT as REPOSITORY

PACKAGE = "synctoken_server"
ROOT = REPOSITORY / "service" / PACKAGE

# Top to bottom: a unit (a subpackage, or a module at the top of the package) may import its
# own modules and any unit on a lower line. Units on one line are siblings and import none of
# each other. The package's __init__ docstring shows the same lines, for readers of the code.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("command",),
    ("cli",),
    ("process", "dev"),
    ("rpc",),
    ("config",),
    ("tokens", "authn", "audit", "limitstore"),
    ("policy",),
    ("metrics", "tracing"),
    ("boundedhttp",),
    ("durations", "filestamps", "errors", "serveroptions"),
)
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name, packages by their __init__."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((PACKAGE, *parts))] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, module of ours) for every import in `path`, in functions and TYPE_CHECKING blocks too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import name`: the module pkg.name if there is one, else pkg itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(f"{PACKAGE}."):
                yield node.lineno, _known(target)


def _known(target: str) -> str:
    """The longest of our modules that `target` names (`a.b.C` -> `a.b` when C is a class)."""
    while target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def _unit(module: str) -> str | None:
    """The subpackage or top-level module a module belongs to; None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


TOML_READER = f"{PACKAGE}.config.reader"
TOML_READER_NAMES = frozenset({"TomlReader"})
"""What reads the file format; config.reader's ConfigError and nest are results, free for any layer above config."""


def toml_readers(name: str, source: str) -> list[str]:
    """Where a module outside config/ imports tomllib or the TOML reader, as `line: what`."""
    if _unit(name) == "config":
        return []
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            found += [f"{node.lineno}: {n}" for n in names if n in ("tomllib", TOML_READER)]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            if node.module == "tomllib":
                found.append(f"{node.lineno}: tomllib")
            elif node.module == f"{PACKAGE}.config" and any(alias.name == "reader" for alias in node.names):
                found.append(f"{node.lineno}: {TOML_READER}")
            elif node.module == TOML_READER:
                found += [f"{node.lineno}: {alias.name}" for alias in node.names if alias.name in TOML_READER_NAMES]
    return found


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def upward_imports(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Every import that goes up a layer or sideways to a sibling, as `file:line: what`."""
    wrong = []
    for module, imports in graph.items():
        unit = _unit(module)
        for line, target in imports:
            other = _unit(target)
            if unit is None or other is None or other == unit:
                continue
            if LEVEL[other] <= LEVEL[unit]:
                where = "a sibling of" if LEVEL[other] == LEVEL[unit] else "above"
                wrong.append(
                    f"{MODULES[module].relative_to(ROOT)}:{line}: imports {target}, and {other} is {where} {unit}"
                )
    return wrong


def cycles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Import cycles between modules (a module importing itself back through others)."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for _, target in graph[module]:
            if state[target] == 1:
                found.append([*path[path.index(target) :], target])
            elif state[target] == 0:
                visit(target, [*path, target])
        state[module] = 2

    for module in graph:
        if state[module] == 0:
            visit(module, [module])
    return found


def shared_class_names(sources: dict[str, str]) -> dict[str, list[str]]:
    """Class names defined more than once across `sources` (path: text), each with its `path:line`s."""
    where: dict[str, list[str]] = {}
    for path, source in sources.items():
        for node in ast.walk(ast.parse(source, path)):
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(f"{path}:{node.lineno}")
    return {name: places for name, places in where.items() if len(places) > 1}


SOURCES = {str(path.relative_to(ROOT)): path.read_text() for path in MODULES.values()}


class TestClassNames:
    def test_no_two_classes_share_a_name(self) -> None:
        """A class name says one thing across the package: no `Refusal` in two modules meaning two things."""
        assert shared_class_names(SOURCES) == {}

    def test_the_check_sees_a_shared_name(self) -> None:
        """The check itself can fail: a second class named like one in another module is found, at both places."""
        sources = {"a.py": "class Refusal:\n    pass\n", "b.py": "x = 1\n\n\nclass Refusal:\n    pass\n"}
        assert shared_class_names(sources) == {"Refusal": ["a.py:1", "b.py:4"]}


class TestLayers:
    def test_every_unit_has_a_layer(self) -> None:
        """A new subpackage or top-level module must be given its place in LAYERS (and the docstring)."""
        units = {_unit(module) for module in MODULES} - {None}
        assert units == set(LEVEL)

    def test_no_import_goes_up_or_sideways(self) -> None:
        """Each unit imports only itself and the units on lower layers."""
        assert upward_imports(GRAPH) == []

    def test_no_import_cycles(self) -> None:
        """No module imports itself back through others, inside a unit or across units."""
        assert cycles(GRAPH) == []

    def test_the_package_docstring_names_the_layers(self) -> None:
        """The layer lines in synctoken_server/__init__.py are these, in this order."""
        docstring = ast.get_docstring(ast.parse((ROOT / "__init__.py").read_text())) or ""
        lines = [line.strip() for line in docstring.splitlines() if line.startswith("    ")]
        assert [tuple(line.split(", ")) for line in lines] == list(LAYERS)

    def test_only_config_reads_toml(self) -> None:
        """No module outside config/ imports tomllib or the TomlReader: the feature folders get typed settings."""
        wrong = {
            str(path.relative_to(ROOT)): found
            for name, path in MODULES.items()
            if (found := toml_readers(name, path.read_text()))
        }
        assert wrong == {}

    def test_the_toml_check_sees_a_reader_outside_config(self) -> None:
        """The check itself can fail: tomllib or TomlReader in a feature module is found, ConfigError is not."""
        source = (
            "import tomllib\n"
            "from synctoken_server.config.reader import ConfigError, TomlReader\n"
            "from synctoken_server.config import reader\n"
        )
        assert toml_readers(f"{PACKAGE}.policy.limits", source) == [
            "1: tomllib",
            "2: TomlReader",
            f"3: {TOML_READER}",
        ]
        assert toml_readers(f"{PACKAGE}.config.limits", source) == []

    @pytest.mark.parametrize("path", sorted(ROOT.glob("*/__init__.py")), ids=lambda path: path.parent.name)
    def test_subpackage_init_is_a_docstring_only(self, path: Path) -> None:
        """A subpackage's __init__ says what the folder holds and imports nothing: no re-exports, no shims."""
        body = ast.parse(path.read_text()).body
        assert len(body) == 1
        assert ast.get_docstring(ast.parse(path.read_text()))

    def test_the_checks_see_an_upward_import_and_a_cycle(self) -> None:
        """The checks themselves can fail: policy importing rpc is both upward and a cycle."""
        graph = {module: list(imports) for module, imports in GRAPH.items()}
        graph["synctoken_server.policy.rules"].append((1, "synctoken_server.rpc.snapshot"))
        assert upward_imports(graph) == [
            "policy/rules.py:1: imports synctoken_server.rpc.snapshot, and rpc is above policy"
        ]
        assert cycles(graph)
