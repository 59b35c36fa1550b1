"""Write a model directory for GPU server checks without real weights: the bundled Qwen3-0.6B config
(random weights via --load-format dummy) with the embedded SmolLM2 tokenizer (its ids fit Qwen3's vocab).

    python tools/build_gpu_server_model.py OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from transformers import AutoTokenizer

from minisgl.core.model_source import BUNDLED_CONFIG_DIR, resolve_model


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUNDLED_CONFIG_DIR / "qwen3-0.6b" / "config.json", out / "config.json")
    source = resolve_model("smollm2-135m")
    AutoTokenizer.from_pretrained(str(source.directory), gguf_file=source.gguf_file).save_pretrained(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
