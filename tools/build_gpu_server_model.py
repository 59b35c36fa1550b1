"""Write a model directory for GPU server checks and online benchmarks without real weights: a bundled
config (random weights via --load-format dummy) with a synthetic word-level tokenizer of the config's
whole vocabulary, so that every id the random model samples decodes to text and is streamed.

    python tools/build_gpu_server_model.py OUT_DIR [--config qwen3-0.6b] [--tokenizer smollm2]

Token i decodes to the word "w<i>" (words are joined by spaces); the config's BOS/EOS ids are ChatML
special tokens and the tokenizer carries a ChatML chat template, so /v1/chat/completions works too. The
SmolLM2 tokenizer used before covers only 49,152 of Qwen3's 151,936 ids: most sampled tokens decoded to
nothing and were never streamed, which left TPOT unmeasurable.

`--tokenizer smollm2` writes the embedded SmolLM2 tokenizer instead (a byte-level BPE whose tokens can
spell JSON), for structured-output checks and benchmarks: grammars never allow the ids beyond its 49,152.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from minisgl.core.loading.gguf_cache import converted
from minisgl.core.loading.loader import load_tokenizer
from minisgl.core.loading.model_source import BUNDLED_CONFIG_DIR, resolve_model

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def synthetic_tokenizer(vocab_size: int, bos_id: int, eos_id: int) -> PreTrainedTokenizerFast:
    specials = {bos_id: "<|endoftext|>", eos_id: "<|im_end|>"}
    start_id = next(i for i in range(vocab_size - 1, -1, -1) if i not in specials)
    specials[start_id] = "<|im_start|>"
    vocab = {specials.get(i, f"w{i}"): i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=specials[bos_id],
        eos_token=specials[eos_id],
        unk_token=specials[bos_id],
        pad_token=specials[bos_id],
        additional_special_tokens=[specials[start_id]],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", default="qwen3-0.6b", help="a bundled config name")
    parser.add_argument("--tokenizer", default="synthetic", choices=["synthetic", "smollm2"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = BUNDLED_CONFIG_DIR / args.config / "config.json"
    shutil.copy(config_path, args.out / "config.json")
    config = json.loads(config_path.read_text())
    if args.tokenizer == "smollm2":
        tokenizer = load_tokenizer(converted(resolve_model("smollm2-135m")))
    else:
        tokenizer = synthetic_tokenizer(config["vocab_size"], config["bos_token_id"], config["eos_token_id"])
    tokenizer.save_pretrained(args.out)
    sample = tokenizer.decode([1, 2, 3, config["vocab_size"] - 2])
    print(f"wrote {args.out}: {args.config} config, {len(tokenizer)} tokens (decode [1,2,3,..] = {sample!r})")


if __name__ == "__main__":
    main()
