"""While the REPL owns the terminal, everything the engine writes to stderr goes to a log file instead.

The redirection is of file descriptor 2 itself, before the engine's processes start: they inherit it, so
their log lines, Python warnings, progress bars and native libraries' messages all land in the file, and
none in the middle of a reply. The shell keeps a stream on the terminal's stderr for its own messages
(loading progress, errors)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

PROGRESS_LOGGER = "minisgl.server.launch"  # the launcher: each process ready, "still loading" lines


def default_log_path() -> Path:
    """One file per shell, so that two shells do not write into each other's log."""
    return Path(tempfile.gettempdir()) / f"minisgl-shell-{os.getpid()}.log"


def redirect_stderr(path: Path) -> TextIO:
    """Point this process's stderr (fd 2, and sys.stderr with it) at path, appended to; return a stream
    that still writes to the terminal's stderr."""
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="replace")
    os.dup2(target, 2)
    os.close(target)
    return terminal


@contextmanager
def progress_on(terminal: TextIO) -> Iterator[None]:
    """Show the launcher's progress lines on the terminal (and in the log) while the model loads."""
    launcher = logging.getLogger(PROGRESS_LOGGER)
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous_level = launcher.level
    launcher.setLevel(logging.INFO)
    launcher.addHandler(handler)
    try:
        yield
    finally:
        launcher.removeHandler(handler)
        launcher.setLevel(previous_level)
