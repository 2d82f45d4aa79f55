"""The source tree keeps its import layers (docs/architecture.md#import-layers).

Every Python file of the package is parsed (nothing is imported or run) and
each import it makes, at module level or inside a function, relative or
absolute, is placed in a layer; an import the table below does not allow
fails. The folders come from pyproject.toml's package-dir, so a new folder
fails here until it is given a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from embedq.cli import ROLE_COMMANDS

ROOT = Path(__file__).resolve().parent.parent

# Layer of each package (the longest matching prefix wins); `stubs` is the generated
# code and the .proto files, `core` the rest of src/embedq (keys, settings, logs, ...).
LAYER_OF_PACKAGE = {
    "embedq": "core",
    "embedq.v1": "stubs",
    "embedq.internal": "stubs",
    "embedq.protos": "stubs",
    "embedq.cli": "entry",
    "embedq.server": "server",
    "embedq.workers": "workers",
    "embedq.client": "client",
    "embedq.bridge": "bridge",
    "embedq.apps": "apps",
    "embedq.tools": "tools",
}
LAYERS = ("stubs", "core", "server", "workers", "client", "bridge", "apps", "entry", "tools")
# What each layer may import besides itself. Nothing but tools imports tools; the
# `embedq` command (entry) names its role commands by module path and imports one
# only when it runs (ROLE_COMMANDS), `embedq bench` included.
MAY_IMPORT = {
    "stubs": set(),
    "core": {"stubs"},
    "server": {"core", "stubs"},
    "workers": {"core", "stubs"},
    "client": {"stubs"},
    "bridge": {"client", "core", "stubs"},
    "apps": {"server", "workers", "client", "core", "stubs"},
    "entry": {"apps", "server", "workers", "client", "bridge", "core", "stubs"},
    "tools": set(LAYERS),
}


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def layer_of(module: str) -> str | None:
    """The layer of a module of ours (by its dotted name), None for anyone else's."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        layer = LAYER_OF_PACKAGE.get(".".join(parts[:end]))
        if layer:
            return layer
    return None


def package_files() -> dict[str, Path]:
    """Module name -> file, for every Python file of every package in package-dir."""
    package_dir = pyproject()["tool"]["setuptools"]["package-dir"]
    modules: dict[str, Path] = {}
    for package, folder in package_dir.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("").parts
            if any(part in ("node_modules", "__pycache__") for part in relative):
                continue
            name = ".".join((package, *relative)).removesuffix(".__init__")
            # A sub-package with a package-dir entry of its own is listed under that entry.
            modules.setdefault(name, path)
    return modules


MODULES = package_files()


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every embedq import in the file, wherever it sits."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                # `from embedq.tools import bench` imports the module embedq.tools.bench.
                submodule = f"{source}.{alias.name}"
                found.append((node.lineno, submodule if submodule in known else source))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name.split(".")[0] == "embedq"]


def violations(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """One line per import that its layer may not make: file:line, the layers, the module."""
    known = set(modules)
    bad: list[str] = []
    for module, path in sorted(modules.items()):
        layer = layer_of(module)
        assert layer, f"{module} ({path}) has no layer"
        for line, target in imports_of(module, path, known):
            target_layer = layer_of(target)
            if target_layer != layer and target_layer not in MAY_IMPORT[layer]:
                where = f"{path.relative_to(root)}:{line}"
                bad.append(f"{where}: {layer} imports {target_layer} ({target})")
    return bad


def test_every_package_folder_has_a_layer() -> None:
    package_dir = pyproject()["tool"]["setuptools"]["package-dir"]
    assert all(layer_of(package) for package in package_dir), package_dir
    assert set(LAYER_OF_PACKAGE.values()) == set(LAYERS) == set(MAY_IMPORT)
    # Each layer's folder is there (the rules are not about an empty tree).
    assert {layer_of(module) for module in MODULES} == set(LAYERS)


def test_no_layer_imports_one_above_it() -> None:
    bad = violations(MODULES)
    assert not bad, "imports against docs/architecture.md#import-layers:\n" + "\n".join(bad)


def test_only_tools_import_tools() -> None:
    assert all("tools" not in allowed for layer, allowed in MAY_IMPORT.items() if layer != "tools")


def test_role_commands_name_modules_of_the_tree() -> None:
    for command, role in ROLE_COMMANDS.items():
        assert role.module in MODULES, f"embedq {command}: no module {role.module}"
        assert layer_of(role.module) in {"apps", "server", "workers", "bridge", "tools"}, command


def test_the_check_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    folder = tmp_path / "server"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "bad.py").write_text(
        "from . import metrics\n"
        "def run():\n"
        "    from embedq.tools import bench\n"
        "    import embedq.workers.worker\n"
    )
    modules = {"embedq.server": folder / "__init__.py", "embedq.server.bad": folder / "bad.py"}
    known = {"embedq.server.metrics", "embedq.tools.bench"}
    assert sorted(imports_of("embedq.server.bad", folder / "bad.py", known)) == [
        (1, "embedq.server.metrics"),
        (3, "embedq.tools.bench"),
        (4, "embedq.workers.worker"),
    ]
    assert violations(modules, tmp_path) == [
        "server/bad.py:3: server imports tools (embedq.tools)",
        "server/bad.py:4: server imports workers (embedq.workers.worker)",
    ]
