#!/bin/bash
# The xqa decode backend on the GPU machine, in one call of under 8 minutes (FlashInfer's XQA JIT included):
# its GPU tests, the offline benchmark of Qwen3-8B over an FP8 KV cache with fi,xqa and with fi, and
# kv_accuracy's price of fi,xqa over FP8 against fi over bf16. From the project root, after
# `source .whl/env.sh`:   bash tools/xqa_gpu_check.sh
# Each step logs to $OUT/<step>.log and prints one summary line; a shared deadline caps the steps.
set -o pipefail
OUT=${OUT:-/tmp/xqa_out}
mkdir -p "$OUT"
# FlashInfer kernels compiled by an earlier call (tools/flashinfer_aot.sh), if brought along.
[ -d .jitcache ] && bash tools/flashinfer_aot.sh restore .jitcache
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws MINISGL_KERNEL_CACHE=/tmp/mk
start=$(date +%s)
deadline=$((start + 465))

# step NAME CAP COMMAND...: run COMMAND for at most CAP seconds (less when the deadline is nearer).
step() {
  local name=$1 cap=$2 left
  shift 2
  left=$((deadline - $(date +%s)))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -le 10 ]; then
    echo "== $name: skipped (deadline)"
    return
  fi
  local t0=$(date +%s)
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $(($(date +%s) - t0)) s (cap $cap s)"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

# xqa: kernel against torch attention, engine against float32 transformers, kv_accuracy; fi+graphs: the
# FlashInfer decode graphs (moved behind GraphAttention) on both shapes of test_gpu_engine.py.
step tests 250 python -m pytest -q -s -m gpu -p no:cacheprovider \
  packages/minisgl-core/tests/test_gpu_xqa.py packages/minisgl-core/tests/test_gpu_engine.py -k "xqa or fi+graphs"
grep -E "relative error|max \|dlogprob\||KVAccuracy|passed|failed|error" "$OUT/tests.log" | tail -20

bench=(python -m minisgl.core.bench --model qwen3-8b --load-format dummy --max-seq-len 4096 --kv-cache-dtype fp8_e4m3)
step bench_fp8_xqa 90 "${bench[@]}" --attn fi,xqa
grep -E "^(prefill|decode|time=)|Error" "$OUT/bench_fp8_xqa.log" | tail -4
step bench_fp8_fi 90 "${bench[@]}" --attn fi
grep -E "^(prefill|decode|time=)|Error" "$OUT/bench_fp8_fi.log" | tail -4

step accuracy 120 python -m minisgl.core.kv_accuracy --model qwen3-8b --load-format dummy \
  --kv-cache-dtype fp8_e4m3 --attn fi,xqa --reference-attn fi \
  --num-prompts 16 --prompt-len 512 --gen-len 64 --num-kv-pages 16384
tail -2 "$OUT/accuracy.log"
echo "== total $(($(date +%s) - start)) s"
