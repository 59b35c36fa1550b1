#!/bin/bash
# Keep FlashInfer's JIT-compiled kernels between device calls (each call gets a fresh machine).
#   bash tools/flashinfer_aot.sh save DIR     # after a run: pack the compiled .so files into DIR/fi_aot.tgz.*
#   bash tools/flashinfer_aot.sh restore DIR  # after `source .whl/env.sh`: install them as FlashInfer's AOT kernels
# FlashInfer loads a kernel from its AOT directory without compiling when <aot>/<name>/<name>.so exists.
set -euo pipefail
mode=$1 dir=$2
case $mode in
  save)
    ops=$(ls -d "${FLASHINFER_WORKSPACE_BASE:-$HOME}"/.cache/flashinfer/*/*/cached_ops)
    (cd "$ops" && ls */*.so | tar czf - -T -) | split -b 15m - "$dir/fi_aot.tgz."
    du -ch "$dir"/fi_aot.tgz.* | tail -1
    ;;
  restore)
    aot=$(python3 -c "import flashinfer.jit.env as e; print(e.FLASHINFER_AOT_DIR)")
    mkdir -p "$aot"
    cat "$dir"/fi_aot.tgz.* | tar xzf - -C "$aot"
    echo "restored $(ls "$aot" | wc -l) FlashInfer kernels into $aot"
    ;;
esac
