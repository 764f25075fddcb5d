#!/usr/bin/env bash
# `make demo`: the built-in demo dataset (made once), then `ddetr train` on it: a local Ray
# with 2 workers, each a DeepSpeed engine. Every run gets its own name (runs/demo-<time>).
set -euo pipefail
PY=${1:-.venv/bin/python}
DEMO_DIR=${2:-data/demo}
if [ ! -f "$DEMO_DIR/val/shards/manifest.json" ]; then
  "$PY" -m ddetr_dist.cli demo-data --out "$DEMO_DIR"
else
  echo "demo data: using $DEMO_DIR (delete it to regenerate)"
fi
# configs/demo.yaml trains in bf16, which CPUs with AVX512-BF16 or AMX compute natively (1.7x
# the fp32 epoch on the 2-core test machine); elsewhere bf16 is emulated, slower than fp32
precision=()
if [ -r /proc/cpuinfo ] && ! grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then
  echo "demo: this CPU computes bf16 only by emulation (no AVX512-BF16 or AMX): training in fp32, slower"
  precision=(train.precision=fp32)
fi
"$PY" -m ddetr_dist.train --config configs/demo.yaml "name=demo-$(date +%Y%m%d-%H%M%S)" \
  "data.train_shards=$DEMO_DIR/train/shards" "data.val_shards=$DEMO_DIR/val/shards" "${precision[@]}"
