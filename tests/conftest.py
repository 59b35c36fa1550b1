"""End-to-end fixtures: real `minisgl serve` processes on free loopback ports, on the CPU.

One server with the real embedded model (SmolLM2-135M) is shared by the whole session; tests that end a
server (signals, a killed scheduler) start their own, with dummy weights to load faster.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

MODEL = "smollm2-135m"
START_TIMEOUT_S = 400.0


def save_smollm2_tokenizer(directory: Path) -> Any:
    """Saves the embedded SmolLM2's tokenizer into directory (for tiny random models that chat) and
    returns it."""
    from transformers import AutoTokenizer

    from minisgl.core.loading.model_source import resolve_model

    source = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(str(source.directory), gguf_file=source.gguf_file)
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_config_fields(tokenizer: Any) -> dict[str, Any]:
    """Config fields of a tiny random 2-layer model over the SmolLM2 tokenizer's vocabulary (the fields
    every architecture shares; each test adds its own)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama over the SmolLM2 tokenizer (config only: serve it with --load-format dummy)."""
    from transformers import LlamaConfig

    directory = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = save_smollm2_tokenizer(directory)
    LlamaConfig(**tiny_config_fields(tokenizer), tie_word_embeddings=True).save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def child_pids(pid: int) -> list[int]:
    """Every descendant of pid (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *child_pids(child)]
    return found


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def leftover_children(children: list[int], grace_s: float = 10.0) -> list[str]:
    """Descendants still running grace_s after their parent exited, as "pid (name)".

    A grace period, because some exit just after the parent: multiprocessing's resource tracker (started by
    `spawn`) leaves only when the last process holding its pipe is gone.
    """
    wait_until(lambda: not any(alive(pid) for pid in children), grace_s)
    return [f"{pid} ({process_name(pid)})" for pid in children if alive(pid)]


def wait_until(condition: object, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(condition())  # type: ignore[operator]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.process.kill()
        raise AssertionError(f"the server did not become healthy in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(
                f"the server ignored signal {signum} for {timeout:.0f} s:\n{self.log_tail()}"
            ) from None


def start_server(tmp: Path, *args: str, mini_sglang_style: bool = False, port: int | None = None) -> Server:
    port = port or free_port()
    log = tmp / f"server-{port}.log"
    command = [sys.executable, "-m", "minisgl"]
    if not mini_sglang_style:
        command.append("serve")
    command += ["--model", MODEL, "--device", "cpu", "--port", str(port), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        # A session of its own: the terminal's Ctrl-C does not reach it; the tests send signals themselves.
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return Server(process, port, log)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared server: the real model, small limits so that overload is cheap to reach."""
    running = start_server(
        tmp_path_factory.mktemp("server"),
        "--max-running-requests", "4",
        "--max-queued-requests", "16",
        "--cpu-kv-cache-gib", "0.5",
        "--log-requests",
    )  # fmt: skip
    try:
        running.wait_ready()
        yield running
    finally:
        stop_cleanly(running, signal.SIGINT)


def stop_cleanly(running: Server, signum: int) -> None:
    """Stop the server with signum and check that it exited with status 0, that none of its processes is
    left (those are killed) and that its port is free again."""
    children = child_pids(running.process.pid)
    code = running.stop(signum)
    leftovers = leftover_children(children)
    for pid in children:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert code == 0, f"exit status {code} after signal {signum}:\n{running.log_tail()}"
    assert not leftovers, f"children left running after signal {signum}: {leftovers}"
    assert wait_until(lambda: port_is_free(running.port), 10), "the port is still bound"
