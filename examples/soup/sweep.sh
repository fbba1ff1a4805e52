#!/usr/bin/env bash
# Optimizer / learning-rate comparison for the soup coefficients on the example fine-tune set
# (made by make_finetunes.py). One `twa soup` run per setting; summarize.py turns the reports into a table.
#
#   bash examples/soup/sweep.sh            # OUT=runs/soup
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[[ -x .venv/bin/twa ]] && export PATH="$PWD/.venv/bin:$PATH"   # as run.sh: the repository's venv, if any
OUT=${OUT:-runs/soup}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(--model examples/fashion_mnist/model.py:cnn --data examples/soup/data.py:finetune
        --holdout examples/soup/data.py:heldout --threads 1 --overwrite -q)   # --model: as in run.sh
run() {  # name, extra flags... (--no-base: mix the ingredients themselves instead of task vectors)
  local name=$1; shift
  local base=(--base "$OUT/pretrained.safetensors")
  [[ "${*: -1}" == "--no-base" ]] && { base=(); set -- "${@:1:$#-1}"; }  # empty: expanded as ${base[@]+...} (bash < 4.4)
  [[ -f "$OUT/sweep/$name/report.json" ]] && { echo "$name exists" >&2; return; }
  python -m twa_tool soup "$OUT/finetunes" "${common[@]}" ${base[@]+"${base[@]}"} --out "$OUT/sweep/$name" "$@"
  echo "$name done" >&2
}
run adamw-1e-3  --optimizer adamw --lr 1e-3
run adamw-1e-2  --optimizer adamw --lr 1e-2
run adamw-1e-1  --optimizer adamw --lr 1e-1
run sgd-0.1     --optimizer sgd --lr 0.1
run sgd-1       --optimizer sgd --lr 1
run adamw-3e-2  --optimizer adamw --lr 3e-2
run adamw-1e-2-10ep --optimizer adamw --lr 1e-2 --epochs 10
run layer-adamw-1e-2 --optimizer adamw --lr 1e-2 --granularity layer
run layer-adamw-1e-3 --optimizer adamw --lr 1e-3 --granularity layer
run bf16-adamw-1e-2 --optimizer adamw --lr 1e-2 --basis-dtype bf16
run int8-adamw-1e-2 --optimizer adamw --lr 1e-2 --basis-dtype int8
run nobase-adamw-1e-2 --optimizer adamw --lr 1e-2 --no-base
