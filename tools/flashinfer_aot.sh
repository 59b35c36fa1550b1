#!/bin/bash
# Keep FlashInfer's JIT-compiled kernels between device calls (each call gets a fresh machine).
#   bash tools/flashinfer_aot.sh save DIR [NAME]  # after a run: pack the .so files compiled in this run
#                                                 # into DIR/NAME.tgz.* (NAME defaults to fi_aot)
#   bash tools/flashinfer_aot.sh restore DIR      # after `source .whl/env.sh`: install every DIR/*.tgz.* set
#                                                 # as FlashInfer's AOT kernels
# FlashInfer loads a kernel from its AOT directory without compiling when <aot>/<name>/<name>.so exists.
set -euo pipefail
mode=$1 dir=$2 name=${3:-fi_aot}
case $mode in
  save)
    ops=$(ls -d "${FLASHINFER_WORKSPACE_BASE:-$HOME}"/.cache/flashinfer/*/*/cached_ops)
    (cd "$ops" && ls */*.so | tar czf - -T -) | split -b 15m - "$dir/$name.tgz."
    du -ch "$dir/$name".tgz.* | tail -1
    ;;
  restore)
    aot=$(python3 -c "import flashinfer.jit.env as e; print(e.FLASHINFER_AOT_DIR)")
    mkdir -p "$aot"
    for first in "$dir"/*.tgz.aa; do
      cat "${first%.aa}".* | tar xzf - -C "$aot"
    done
    echo "restored $(ls "$aot" | wc -l) FlashInfer kernels into $aot"
    ;;
esac
