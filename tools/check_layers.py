#!/usr/bin/env python3
"""Check that minisgl's imports point down the layers: shell -> server -> core -> kernels.

A file belongs to the layer of the distribution it lives in (packages/minisgl-<layer>/src or tests). It may
import its own layer and any layer below it, never one above. The check reads the source with `ast`, so
it sees imports inside functions too, and `importlib.import_module("minisgl.x")` calls with a literal name.

It also enforces the PEP 420 namespace: no distribution may ship `minisgl/__init__.py`, and each ships only
its own subpackage under `minisgl/` (minisgl-server also ships `minisgl/__main__.py`).

    python tools/check_layers.py [--root REPO]      exit 0 when clean, 1 with one line per violation
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LAYERS = ("kernels", "core", "server", "shell")  # bottom to top
EXTRA_TOP_LEVEL = {"server": {"__main__.py"}}  # files a distribution may ship directly under minisgl/
IGNORED_NAMES = {"__pycache__", "py.typed"}


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    message: str

    def render(self, root: Path) -> str:
        try:
            shown = self.path.relative_to(root)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}: {self.message}"


def allowed(importer: str, imported: str) -> bool:
    return imported in LAYERS and LAYERS.index(imported) <= LAYERS.index(importer)


def module_name(path: Path, src: Path) -> str:
    """Dotted module name of a file under a src directory (a package's own name for __init__.py)."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve_relative(module: str | None, level: int, current: str, is_package: bool) -> str | None:
    """Absolute name of `from <level dots><module> import ...` inside module `current`."""
    package = current.split(".") if is_package else current.split(".")[:-1]
    if level - 1 >= len(package):
        return None  # climbs above the top-level package; Python rejects it too
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imported_modules(tree: ast.AST, current: str | None, is_package: bool) -> Iterator[tuple[int, str]]:
    """Yield (line, module) for every module the file may import, submodules named in `from` included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = resolve_relative(node.module, node.level, current, is_package) if current else None
                if base is None:
                    continue
            else:
                base = node.module or ""
            yield node.lineno, base
            # `from minisgl import server` imports minisgl.server.
            for alias in node.names:
                if base == "minisgl" and alias.name != "*":
                    yield node.lineno, f"minisgl.{alias.name}"
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("import_module", "__import__")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def check_file(path: Path, layer: str, src: Path | None) -> list[Violation]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as error:
        return [Violation(path, error.lineno or 0, f"cannot parse: {error.msg}")]
    current = module_name(path, src) if src is not None else None
    is_package = path.name == "__init__.py"
    violations = []
    for line, module in imported_modules(tree, current, is_package):
        parts = module.split(".")
        if parts[0] != "minisgl" or len(parts) < 2 or parts[1] == "__main__":
            continue
        if not allowed(layer, parts[1]):
            violations.append(Violation(path, line, f"minisgl.{layer} imports minisgl.{parts[1]}"))
    return violations


def check_namespace(package_dir: Path, layer: str) -> list[Violation]:
    namespace = package_dir / "src" / "minisgl"
    if not namespace.is_dir():
        return []
    violations = []
    expected = {layer} | EXTRA_TOP_LEVEL.get(layer, set())
    for entry in sorted(namespace.iterdir()):
        if entry.name == "__init__.py":
            violations.append(Violation(entry, 1, "minisgl is a PEP 420 namespace: remove this __init__.py"))
        elif entry.name not in expected | IGNORED_NAMES:
            violations.append(
                Violation(entry, 1, f"minisgl-{layer} may only ship minisgl/{layer} under minisgl/")
            )
    return violations


def check_tree(root: Path) -> tuple[list[Violation], int]:
    """All violations under root/packages, and the number of Python files read."""
    violations: list[Violation] = []
    files = 0
    for package_dir in sorted((root / "packages").glob("minisgl-*")):
        layer = package_dir.name.removeprefix("minisgl-")
        if layer not in LAYERS:
            violations.append(Violation(package_dir, 0, f"unknown layer {layer!r}: expected one of {LAYERS}"))
            continue
        violations += check_namespace(package_dir, layer)
        for part in ("src", "tests"):
            base = package_dir / part
            for path in sorted(base.rglob("*.py")):
                files += 1
                violations += check_file(path, layer, base if part == "src" else None)
    return violations, files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    root = args.root.resolve()
    violations, files = check_tree(root)
    for violation in violations:
        print(violation.render(root))
    if violations:
        print(f"{len(violations)} layer violation(s) in {files} files", file=sys.stderr)
        return 1
    if files == 0:
        print(f"no Python files under {root / 'packages'}", file=sys.stderr)
        return 1
    print(f"layers ok: {files} files checked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
