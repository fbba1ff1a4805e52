#!/usr/bin/env bash
# Extra TWA runs on the checkpoints run.sh trained: other learning rates for the head and tail
# stages, and the tail fitted on a held-out 10% of the training split (TWA-v) instead of all of it.
# Baselines are limited to SWA (the TWA result does not depend on them; this saves ~4 min a run).
# Runs whose report already exists are skipped.
#
#   bash examples/fashion_mnist/run.sh && bash examples/fashion_mnist/lr_sweep.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[[ -x .venv/bin/twa ]] && export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-runs/fashion_mnist}
DATA_ROOT=${DATA_ROOT:-}       # as run.sh: empty means the Debian package /usr/share/datasets/fashion-mnist
MODEL=examples/fashion_mnist/model.py:cnn
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SWEEP="$OUT/lr_sweep"
[[ -f "$OUT/ckpts/20.pt" ]] || { echo "error: $OUT/ckpts/20.pt missing; run examples/fashion_mnist/run.sh first" >&2; exit 2; }
mkdir -p "$SWEEP"
data_root_args=()
[[ -n "$DATA_ROOT" ]] && data_root_args=(--data-root "$DATA_ROOT")

average() {  # average NAME TWA-OPTIONS...
  local name=$1 t=$SECONDS
  shift
  if [[ -s "$SWEEP/$name.json" ]]; then echo "== $name: exists, skipped" >&2; return; fi
  echo "== $name: twa average $OUT/ckpts $*" >&2
  twa average "$OUT/ckpts" --model "$MODEL" --data fashion-mnist ${data_root_args[@]+"${data_root_args[@]}"} \
    --epochs 2 --baselines swa "$@" --out "$SWEEP/$name" --overwrite --json > "$SWEEP/$name.json" \
    2> "$SWEEP/$name.log" || {
    local code=$?
    echo "error: $name failed (exit $code): $(tail -n 1 "$SWEEP/$name.log"); log in $SWEEP/$name.log" >&2
    exit "$code"
  }
  echo "$name $((SECONDS - t))s" | tee -a "$SWEEP/timings.txt" >&2
}

head=(--range 0:11)
tail=(--range 11:21 --start last --wd 5e-5)
average head_lr1 "${head[@]}" --lr 1
average head_lr0.5 "${head[@]}" --lr 0.5
average tail_lr1 "${tail[@]}" --lr 1
average tail_lr0.5 "${tail[@]}" --lr 0.5
average tail_lr0.1 "${tail[@]}" --lr 0.1
average tail_holdout_lr2 "${tail[@]}" --lr 2 --fit-on holdout
average tail_holdout_lr0.5 "${tail[@]}" --lr 0.5 --fit-on holdout

python examples/fashion_mnist/summarize.py "$OUT" \
  head_lr2="$OUT/head.json" head_lr1="$SWEEP/head_lr1.json" head_lr0.5="$SWEEP/head_lr0.5.json" \
  tail_lr2="$OUT/tail.json" tail_lr1="$SWEEP/tail_lr1.json" tail_lr0.5="$SWEEP/tail_lr0.5.json" \
  tail_lr0.1="$SWEEP/tail_lr0.1.json" tail_holdout_lr2="$SWEEP/tail_holdout_lr2.json" \
  tail_holdout_lr0.5="$SWEEP/tail_holdout_lr0.5.json" | tee "$OUT/lr_sweep.md"
