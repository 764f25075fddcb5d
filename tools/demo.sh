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
"$PY" -m ddetr_dist.train --config configs/demo.yaml "name=demo-$(date +%Y%m%d-%H%M%S)" \
  "data.train_shards=$DEMO_DIR/train/shards" "data.val_shards=$DEMO_DIR/val/shards"
