#!/usr/bin/env bash
# `make demo`: the built-in demo dataset (made once), then the pipeline end to end on it.
set -euo pipefail
PY=${1:-.venv/bin/python}
DEMO_DIR=${2:-data/demo}
if [ ! -f "$DEMO_DIR/val/shards/manifest.json" ]; then
  "$PY" -m ddetr_dist.cli demo-data --out "$DEMO_DIR"
else
  echo "demo data: using $DEMO_DIR (delete it to regenerate)"
fi
"$PY" -m ddetr_dist.engine.smoke --config configs/demo.yaml \
  "data.train_shards=$DEMO_DIR/train/shards" "data.val_shards=$DEMO_DIR/val/shards"
