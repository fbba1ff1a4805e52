#!/usr/bin/env bash
# Post-training step for any CI: train briefly, average with TWA, gate on SWA, keep the artifacts.
# Usage: examples/ci/post_train.sh [OUT]   (runs offline on CPU in about a minute)
set -euo pipefail
OUT=${1:-runs/ci}
export NO_COLOR=1                     # plain logs
export TWA_AVERAGE_DEVICE=${TWA_AVERAGE_DEVICE:-auto}   # every option has a TWA_<COMMAND>_<OPTION> default

# 1. "training": the built-in demo run writes one checkpoint per epoch (replace with your trainer)
python - "$OUT" <<'PY'
import sys
from pathlib import Path
from twa_tool.demo import DemoTrainConfig, train_checkpoints
train_checkpoints(DemoTrainConfig(out_dir=Path(sys.argv[1]) / "ckpts", epochs=6, overwrite=True))
PY

# 2. what will be used, without touching anything (--overwrite: a rerun replaces the last run's output)
twa average "$OUT/ckpts" --data synthetic --out "$OUT/twa" --overwrite --dry-run

# 3. TWA with a quality gate; the report goes to a file, human logs to stderr
status=0
twa average "$OUT/ckpts" --data synthetic --epochs 4 --out "$OUT/twa" --overwrite \
    --json --fail-if-worse-than swa --tolerance 0.005 --on-worse fallback > "$OUT/twa.json" || status=$?
case $status in
  0) echo "TWA passed the gate" ;;
  3) written=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['written_method'])" "$OUT/twa.json")
     echo "TWA was worse than SWA: the $written baseline was written instead (see $OUT/twa.json)" ;;
  *) echo "twa failed with exit code $status" >&2; exit $status ;;
esac
python -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: round(v['accuracy'], 4) for k, v in r['metrics'].items()})" "$OUT/twa.json"
