#!/usr/bin/env bash
# The soup example end to end on Fashion-MNIST (about 5 minutes on one CPU thread):
#   1. make_finetunes.py: pretrain a small BN CNN on 10k training images, fine-tune 8 variants of it
#      (lr / augmentation / label smoothing / seed) on 10k other images;
#   2. twa soup with the defaults (written: the best soup on the 2k held-out images), then the
#      per-layer coefficients; summarize.py prints the table of RESULTS.md.
#
#   bash examples/soup/run.sh            # OUT=runs/soup
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."          # repository root
[[ -x .venv/bin/twa ]] && export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-runs/soup}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ -f "$OUT/finetunes.json" ]]; then
  echo "== $OUT/finetunes.json exists, skipping the fine-tunes" >&2
else
  python examples/soup/make_finetunes.py --out "$OUT"
fi
# --model: the ingredients record this file spec, but twa runs no code named by a checkpoint unless it is passed
common=(--model examples/fashion_mnist/model.py:cnn --data examples/soup/data.py:finetune
        --holdout examples/soup/data.py:heldout --base "$OUT/pretrained.safetensors" --threads 1 --overwrite)
python -m twa_tool soup "$OUT/finetunes" "${common[@]}" --out "$OUT/soup"
python -m twa_tool soup "$OUT/finetunes" "${common[@]}" --granularity layer --out "$OUT/soup-layer" -q
python examples/soup/summarize.py "$OUT/soup/report.json" "$OUT/soup-layer/report.json"
