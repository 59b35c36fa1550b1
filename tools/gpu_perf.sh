#!/bin/bash
# One GPU call for performance work: offline benches with step timelines, a decode profile.
# On the device machine, from the project root:  bash tools/gpu_perf.sh "<bench runs>"
# Each bench run is "name:model:extra flags" separated by ';'; timelines land in $OUT/name.json.
set -o pipefail
source .whl/env.sh || exit 1
# FlashInfer kernels compiled by an earlier call (tools/flashinfer_aot.sh), if brought along.
[ -d .jitcache ] && bash tools/flashinfer_aot.sh restore .jitcache
export PYTHONPATH=$PYTHONPATH:$PWD FLASHINFER_WORKSPACE_BASE=/tmp/fiws MINISGL_KERNEL_CACHE=/tmp/mk
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader
IFS=';' read -ra runs <<< "$1"
for run in "${runs[@]}"; do
  IFS=':' read -r name model flags <<< "$run"
  start=$(date +%s)
  # shellcheck disable=SC2086
  python -m minisgl.core.bench --model "$model" --load-format dummy --max-seq-len 4096 --time-device \
    --timeline "$OUT/$name.json" $flags > "$OUT/$name.log" 2>&1
  echo "== $name ($model $flags): rc=$? in $(( $(date +%s) - start )) s"
  grep -E "^(prefill|time=)|Error|error" "$OUT/$name.log" | tail -4
done
