"""Process supervision: signals stop every child and free the port; a dead scheduler takes the server
down with an error instead of leaving it half alive."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

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


def test_sigterm_lets_running_requests_finish_then_ends_open_streams(tmp_path: Path) -> None:
    server = start_server(tmp_path, *DUMMY, "--shutdown-timeout", "15")
    try:
        server.wait_ready()
        children = child_pids(server.process.pid)
        endless = {"prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        # A few steps long: usually still running when the signal lands, yet well within the timeout.
        short = {"prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
        results: dict[str, Any] = {}

        def finish_short() -> None:
            results["short"] = httpx.post(f"{server.url}/v1/completions", json=short, timeout=60)

        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", f"{server.url}/v1/completions", json=endless) as response,
        ):
            assert response.status_code == 200
            lines = response.iter_lines()
            frames = [next(line for line in lines if line.startswith("data: "))]
            sender = threading.Thread(target=finish_short)
            sender.start()
            # The signal lands once the short request runs too (the scheduler holds both), or, on a fast
            # machine, once it has already finished.
            assert wait_until(lambda: "short" in results or _running(server.url) >= 2, 60)
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(1.0)
            refused = httpx.post(f"{server.url}/v1/completions", json=short, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            frames += [line for line in lines if line.startswith("data: ")]
            ended = time.monotonic() - signalled
        sender.join()
        assert 14.5 < ended < 45, ended  # the stream ran until --shutdown-timeout, then was ended
        assert frames[-1] == "data: [DONE]", frames[-3:]
        events = [json.loads(f[len("data: ") :]) for f in frames[:-1]]
        errors = [e for e in events if "error" in e]
        assert errors and "shutting down" in errors[0]["error"]["message"], events[-3:]
        assert events[-1]["choices"][0]["finish_reason"] == "abort"
        assert results["short"].status_code == 200, results["short"].text  # a running request finished
        assert server.process.wait(30) == 0, server.log_tail()
        assert wait_until(lambda: not any(alive(pid) for pid in children), 10), [
            p for p in children if alive(p)
        ]
        assert wait_until(lambda: port_is_free(server.port), 10)
    finally:
        if server.process.poll() is None:  # a failed check above: do not leave it running
            server.process.kill()
            server.process.wait(10)


def test_a_second_server_on_a_port_being_loaded_fails_at_once(tmp_path: Path) -> None:
    first = start_server(tmp_path, *DUMMY)
    try:
        assert wait_until(lambda: "loading" in first.log.read_text(), 60), first.log_tail()
        started = time.monotonic()
        (tmp_path / "second").mkdir()
        second = start_server(tmp_path / "second", *DUMMY, port=first.port)
        code = second.process.wait(60)
        took = time.monotonic() - started
        assert code == 1, second.log_tail()
        assert (
            f"cannot listen on 127.0.0.1:{first.port}: the port is already in use" in second.log.read_text()
        )
        assert "loading" not in second.log.read_text()
        assert took < 15, took  # interpreter start-up and imports; the model is never loaded
        first.wait_ready()  # the first one is unharmed
    finally:
        first.stop()


def _running(url: str) -> int:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("minisgl:num_requests_running{"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0
