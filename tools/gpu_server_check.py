"""Start `minisgl serve` on a CUDA machine with random weights and check it with the openai client.

    python tools/build_gpu_server_model.py .gpu_model     # on the CPU machine: a config + tokenizer dir
    python tools/gpu_server_check.py .gpu_model           # on the GPU machine

Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

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


def main() -> None:
    model = sys.argv[1]
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    port = 19191
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "minisgl",
            "serve",
            "--model",
            model,
            "--load-format",
            "dummy",
            "--device",
            device,
            "--port",
            str(port),
            "--max-seq-len",
            "4096",
        ]
    )
    failures = 0
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, 600)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        name = client.models.list().data[0].id
        chat = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=16, temperature=0
        )
        print(
            "chat:",
            chat.choices[0].finish_reason,
            chat.usage.completion_tokens,
            repr(chat.choices[0].message.content),
        )
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
        failures += usage is None or "".join(pieces) != chat.choices[0].message.content
        completion = client.completions.create(
            model=name, prompt="Once upon a time", max_tokens=32, n=2, temperature=0.8
        )
        print("completions n=2:", [c.finish_reason for c in completion.choices], completion.usage)
        failures += len(completion.choices) != 2
    finally:
        server.terminate()
        server.wait(timeout=60)
    print("failures:", failures)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
