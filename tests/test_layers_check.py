"""tools/check_layers.py: imports point down the layers, and minisgl stays a namespace package."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "check_layers.py"


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), "--root", str(root)], capture_output=True, text=True, check=False
    )


def write(root: Path, relative: str, source: str = "") -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def make_clean_tree(root: Path) -> None:
    write(root, "packages/minisgl-kernels/src/minisgl/kernels/__init__.py", "import torch\n")
    write(
        root,
        "packages/minisgl-core/src/minisgl/core/engine/runner.py",
        """\
        from minisgl.kernels import reference
        from . import sampler
        from ..cache import radix
        """,
    )
    write(root, "packages/minisgl-server/src/minisgl/__main__.py", "from minisgl.server.cli import main\n")
    write(
        root,
        "packages/minisgl-server/src/minisgl/server/cli.py",
        "import minisgl.core\nimport minisgl.kernels\n",
    )
    write(root, "packages/minisgl-shell/src/minisgl/shell/repl.py", "from minisgl import server, core\n")
    write(root, "packages/minisgl-shell/tests/test_repl.py", "import minisgl.shell.repl\n")


def test_real_tree_is_clean() -> None:
    result = run_check(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "layers ok" in result.stdout


def test_clean_temp_tree_passes(tmp_path: Path) -> None:
    make_clean_tree(tmp_path)
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_upward_imports_are_reported(tmp_path: Path) -> None:
    make_clean_tree(tmp_path)
    write(
        tmp_path,
        "packages/minisgl-core/src/minisgl/core/llm.py",
        """\
        import importlib

        import minisgl.kernels


        def launch() -> None:
            from minisgl.server import launch

            importlib.import_module("minisgl.shell.repl")
        """,
    )
    write(tmp_path, "packages/minisgl-kernels/tests/test_x.py", "from minisgl import core\n")
    # Relative imports resolve too: from minisgl/core/engine, `...server` is minisgl.server.
    write(tmp_path, "packages/minisgl-core/src/minisgl/core/engine/graph.py", "from ...server import cli\n")

    result = run_check(tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "packages/minisgl-core/src/minisgl/core/engine/graph.py:1: minisgl.core imports minisgl.server",
        "packages/minisgl-core/src/minisgl/core/llm.py:7: minisgl.core imports minisgl.server",
        "packages/minisgl-core/src/minisgl/core/llm.py:9: minisgl.core imports minisgl.shell",
        "packages/minisgl-kernels/tests/test_x.py:1: minisgl.kernels imports minisgl.core",
    ]


def test_namespace_init_and_foreign_subpackages_are_reported(tmp_path: Path) -> None:
    make_clean_tree(tmp_path)
    write(tmp_path, "packages/minisgl-core/src/minisgl/__init__.py")
    write(tmp_path, "packages/minisgl-kernels/src/minisgl/server/__init__.py")

    result = run_check(tmp_path)
    assert result.returncode == 1
    assert "packages/minisgl-core/src/minisgl/__init__.py:1: minisgl is a PEP 420 namespace" in result.stdout
    assert "packages/minisgl-kernels/src/minisgl/server:1: minisgl-kernels may only ship" in result.stdout


def test_empty_tree_fails(tmp_path: Path) -> None:
    (tmp_path / "packages").mkdir()
    assert run_check(tmp_path).returncode == 1
