"""Process supervision: signals stop every child and free the port; a dead scheduler takes the server
down with an error instead of leaving it half alive."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import alive, child_pids, port_is_free, process_name, start_server, wait_until

DUMMY = ("--load-format", "dummy", "--cpu-kv-cache-gib", "0.1")


def test_sigterm_stops_everything(tmp_path: Path) -> None:
    # Also the mini-sglang spelling: `python -m minisgl --model M ...` serves.
    server = start_server(tmp_path, *DUMMY, mini_sglang_style=True)
    server.wait_ready()
    children = child_pids(server.process.pid)
    names = {process_name(pid) for pid in children}
    assert {"minisgl-sched0", "minisgl-tok"} <= names, names
    log = server.log.read_text()
    assert (
        "minisgl-scheduler-0 ready" in log and "minisgl-tokenizer ready" in log and "context_length=" in log
    )
    assert server.stop(signal.SIGTERM) == 0, server.log_tail()
    assert wait_until(lambda: not any(alive(pid) for pid in children), 10), [p for p in children if alive(p)]
    assert wait_until(lambda: port_is_free(server.port), 10)


def test_a_killed_scheduler_takes_the_server_down(tmp_path: Path) -> None:
    server = start_server(tmp_path, *DUMMY)
    server.wait_ready()
    children = child_pids(server.process.pid)
    (scheduler,) = [pid for pid in children if process_name(pid) == "minisgl-sched0"]
    os.kill(scheduler, signal.SIGKILL)
    killed_at = time.monotonic()

    def health_fails() -> bool:
        try:
            return httpx.get(f"{server.url}/health", timeout=2).status_code != 200
        except httpx.HTTPError:
            return True

    assert wait_until(health_fails, 10)
    code = server.process.wait(20)
    assert code != 0, server.log_tail()
    assert time.monotonic() - killed_at < 15
    assert "minisgl-scheduler-0 died" in server.log.read_text()
    assert wait_until(lambda: not any(alive(pid) for pid in children), 10), [p for p in children if alive(p)]
    assert wait_until(lambda: port_is_free(server.port), 10)


def test_a_busy_port_fails_fast() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "minisgl", "serve", "--device", "cpu", "--port", str(port)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "already in use" in result.stderr
