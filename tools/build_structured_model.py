"""Write a model directory for structured-output checks and benchmarks on a machine without the embedded
model: a bundled config (random weights via load_format="dummy") with the embedded SmolLM2 tokenizer, a
byte-level BPE whose tokens can spell JSON (the word-level tokenizer of build_gpu_server_model.py cannot).

    python tools/build_structured_model.py OUT_DIR [--config qwen3-0.6b]     # on the CPU machine

Qwen3's ids beyond SmolLM2's 49,152 tokens decode to nothing; grammars never allow them.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from minisgl.core.gguf_cache import converted
from minisgl.core.loader import load_tokenizer
from minisgl.core.model_source import BUNDLED_CONFIG_DIR, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", default="qwen3-0.6b", help="a bundled config name")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUNDLED_CONFIG_DIR / args.config / "config.json", args.out / "config.json")
    tokenizer = load_tokenizer(converted(resolve_model("smollm2-135m")))
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}: {args.config} config, SmolLM2 tokenizer ({len(tokenizer)} tokens)")


if __name__ == "__main__":
    main()
