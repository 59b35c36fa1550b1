"""Start `minisgl serve` on a CUDA machine with random weights and check it with the openai client.

    python tools/build_gpu_server_model.py .gpu_model     # on the CPU machine: a config + tokenizer dir
    python tools/gpu_server_check.py .gpu_model           # on the GPU machine
    python tools/gpu_server_check.py --url http://127.0.0.1:1919   # a server that is already running

Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit("server did not become healthy")


def start_server(model: str, device: str, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "minisgl", "serve", "--model", model, "--load-format", "dummy"]
    command += ["--device", device, "--port", str(port), "--max-seq-len", "4096"]
    return subprocess.Popen(command)


def check(url: str) -> int:
    """Run the openai-client checks against a server; returns the number that failed."""
    from openai import OpenAI

    failures = 0
    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    name = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=16, temperature=0
    )
    text = chat.choices[0].message.content
    print("chat:", chat.choices[0].finish_reason, chat.usage.completion_tokens, repr(text))
    failures += chat.usage.completion_tokens < 1
    pieces = []
    stream = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    print("chat stream:", len(pieces), "chunks, usage", usage)
    failures += usage is None or "".join(pieces) != text
    completion = client.completions.create(
        model=name, prompt="Once upon a time", max_tokens=32, n=2, temperature=0.8
    )
    print("completions n=2:", [c.finish_reason for c in completion.choices], completion.usage)
    failures += len(completion.choices) != 2 or not all(c.text for c in completion.choices)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", help="model directory to serve (omit with --url)")
    parser.add_argument("device", nargs="?", default="cuda")
    parser.add_argument("--url", help="check this running server instead of starting one")
    args = parser.parse_args()
    if args.url:
        failures = check(args.url.rstrip("/"))
    elif args.model:
        port = 19191
        server = start_server(args.model, args.device, port)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server, 600)
            failures = check(f"http://127.0.0.1:{port}")
        finally:
            server.terminate()
            server.wait(timeout=60)
    else:
        parser.error("give a model directory or --url")
    print("failures:", failures)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
