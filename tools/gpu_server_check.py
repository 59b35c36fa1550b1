"""Start `minisgl serve` on a CUDA machine with random weights and check it with the openai client.

    python tools/build_gpu_server_model.py .gpu_model     # on the CPU machine: a config + tokenizer dir
    python tools/gpu_server_check.py .gpu_model           # on the GPU machine
    python tools/gpu_server_check.py --url http://127.0.0.1:1919   # a server that is already running
    python tools/gpu_server_check.py DIR --structured   # also grammars and tools (DIR from --tokenizer smollm2)

Prints one line per check and exits non-zero if any fails. With random weights only what the engine
guarantees is checked: counts and streams, and with --structured that every constrained reply (concurrent,
mixed with free ones, under overlap scheduling and decode CUDA graphs) parses and validates.
"""

from __future__ import annotations

import argparse
import json
import re
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


# Bounded strings and arrays, so that even a random model's constrained reply ends within max_tokens.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["name", "age", "role", "tags"],
}
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}},
    "required": ["city"],
}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}
CODE = r"[a-z]{3,8}-[0-9]{2}"


def check_structured(url: str, concurrency: int = 48) -> int:
    """Concurrent json_schema, regex, forced-tool and free chat requests; returns how many failed."""
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    name = client.models.list().data[0].id
    ask = [{"role": "user", "content": "Describe a person."}]

    def one(i: int) -> str | None:
        """None when the reply is what the request forces, else what went wrong."""
        kind = ("schema", "regex", "tool", "free")[i % 4]
        options: dict[str, object] = {"model": name, "messages": ask, "temperature": 0.8, "max_tokens": 200}
        if kind == "schema":
            schema = {"name": "person", "schema": PERSON_SCHEMA, "strict": True}
            options["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif kind == "regex":
            options["extra_body"] = {"regex": CODE}
        elif kind == "tool":
            options.update(tools=[WEATHER_TOOL], tool_choice="required")
        choice = client.chat.completions.create(**options).choices[0]  # type: ignore[call-overload]
        text = choice.message.content or ""
        try:
            if kind == "schema":
                jsonschema.validate(json.loads(text), PERSON_SCHEMA)
            elif kind == "regex" and not re.fullmatch(CODE, text):
                return f"regex reply {text!r}"
            elif kind == "tool":
                call = choice.message.tool_calls[0]
                assert choice.finish_reason == "tool_calls" and call.function.name == "get_weather"
                jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
        except Exception as exc:  # any parse or validation failure is a failed check
            return f"{kind}: {type(exc).__name__}: {exc} ({choice.finish_reason}, {text[:200]!r})"
        return None

    with ThreadPoolExecutor(concurrency) as pool:
        problems = [p for p in pool.map(one, range(2 * concurrency)) if p is not None]
    print(f"structured: {2 * concurrency} concurrent requests, {len(problems)} failed")
    for problem in problems[:5]:
        print("  ", problem)
    return len(problems)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", help="model directory to serve (omit with --url)")
    parser.add_argument("device", nargs="?", default="cuda")
    parser.add_argument("--url", help="check this running server instead of starting one")
    parser.add_argument("--structured", action="store_true", help="also check grammars and forced tools")
    args = parser.parse_args()

    def run_checks(url: str) -> int:
        return check(url) + (check_structured(url) if args.structured else 0)

    if args.url:
        failures = run_checks(args.url.rstrip("/"))
    elif args.model:
        port = 19191
        server = start_server(args.model, args.device, port)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server, 600)
            failures = run_checks(f"http://127.0.0.1:{port}")
        finally:
            server.terminate()
            server.wait(timeout=60)
    else:
        parser.error("give a model directory or --url")
    print("failures:", failures)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
