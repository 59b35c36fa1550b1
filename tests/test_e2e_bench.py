"""`minisgl bench serve` against the live CPU server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import Server


def test_bench_serve_against_the_server(server: Server, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "minisgl", "bench", "serve", "--url", server.url, "--num-prompts", "6",
         "--input-len", "8", "32", "--output-len", "4", "8", "--json", str(report)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for word in ("TTFT", "TPOT", "E2E", "p99", "output tok/s"):
        assert word in result.stdout
    data = json.loads(report.read_text())
    assert data["num_ok"] == 6 and data["output_tokens"] >= 24 and data["ttft_ms"]["p50"] > 0
