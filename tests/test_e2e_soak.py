"""The soak's small version: varied requests, aborts and disconnects against a live server that checks its
KV cache's integrity after every step (MINISGL_DEBUG_CHECKS=1); then no page may be leaked."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import start_server, stop_cleanly


def test_a_small_soak_leaks_nothing(
    tmp_path: Path, tiny_chat_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINISGL_DEBUG_CHECKS", "1")  # the server's processes inherit it
    # The tiny model and a small cache keep it quick: the integrity check walks every page after each step.
    server = start_server(
        tmp_path, "--model", str(tiny_chat_model), "--load-format", "dummy", "--num-kv-pages", "4096",
        "--max-running-requests", "8",
    )  # fmt: skip
    try:
        server.wait_ready()
        report_path = tmp_path / "soak.json"
        result = subprocess.run(
            [
                sys.executable, "-m", "minisgl", "bench", "soak", "--url", server.url, "--num-requests", "40",
                "--concurrency", "8", "--max-tokens", "8", "--max-prompt-words", "40", "--server-pid", str(server.process.pid),
                "--rss-growth-limit", "1.0", "--json-out", str(report_path),
            ],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
        report = json.loads(report_path.read_text())
        assert report["errors"] == [] and report["leaked_pages"] == 0 and report["health"] == 200
        assert report["outcomes"].get("aborted", 0) > 0 and report["outcomes"]["ok"] > 20, report["outcomes"]
        assert "Traceback" not in server.log.read_text()
    finally:
        stop_cleanly(server, signal.SIGTERM)
