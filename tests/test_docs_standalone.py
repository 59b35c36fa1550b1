"""The documentation stands alone: the README, docs/, the package READMEs, the sources (whose docstrings
become --help text) and the CLI's --help cite no design notes that are not in this repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTSIDE_NOTES = ("DESIGN.md", "DESIGN's", "../shared", ".whl/")


def test_docs_and_sources_cite_nothing_outside_the_repository() -> None:
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "packages").glob("*/README.md")]
    files += list((REPO / "packages").glob("*/src/**/*.py"))
    citing = [str(f.relative_to(REPO)) for f in files if any(n in f.read_text() for n in OUTSIDE_NOTES)]
    assert not citing, citing


def test_help_cites_nothing_outside_the_repository() -> None:
    for command in (["serve", "--help"], ["bench", "--help"]):
        result = subprocess.run(
            [sys.executable, "-m", "minisgl", *command], capture_output=True, text=True, check=True
        )
        assert not any(n in result.stdout for n in OUTSIDE_NOTES), command
