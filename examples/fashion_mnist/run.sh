#!/usr/bin/env bash
# Fashion-MNIST end to end: a plain 20-epoch SGD run saving a checkpoint per epoch, then TWA on
# its first half ("head": init + epochs 1..10, before any lr decay) and on its second half
# ("tail": epochs 11..20), each compared with the last/best checkpoint, SWA and the full run.
#
#   bash examples/fashion_mnist/run.sh            # OUT=runs/fashion_mnist
#   OUT=/tmp/fm TWA_LR=1 bash examples/fashion_mnist/run.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."          # repository root
[[ -x .venv/bin/twa ]] && export PATH="$PWD/.venv/bin:$PATH"

OUT=${OUT:-runs/fashion_mnist}
TWA_LR=${TWA_LR:-2}            # TWA's P-SGD learning rate (the reference's CIFAR value)
DATA_ROOT=${DATA_ROOT:-}       # empty: the Debian package /usr/share/datasets/fashion-mnist
MODEL=examples/fashion_mnist/model.py:cnn
# One intra-op thread: on the shared 2-core machine this was measured on, two threads ran 2-7x
# slower whenever another process held a core. Set OMP_NUM_THREADS=N on an idle multi-core box.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p "$OUT"
data_root_args=()   # expanded as ${a[@]+"${a[@]}"}: bash < 4.4 (macOS) calls an empty "${a[@]}" unbound under set -u
[[ -n "$DATA_ROOT" ]] && data_root_args=(--data-root "$DATA_ROOT")
timings="$OUT/timings.txt"
echo "# $(date -Is) OMP_NUM_THREADS=$OMP_NUM_THREADS TWA_LR=$TWA_LR" >> "$timings"
log_time() { echo "$1 $((SECONDS - $2))s" | tee -a "$timings" >&2; }

# 1. The ordinary training run (0.pt = init, E.pt after epoch E, history.json).
if [[ -f "$OUT/ckpts/20.pt" ]]; then
  echo "== train: $OUT/ckpts/20.pt exists, skipping training" >&2
else
  t=$SECONDS
  python examples/fashion_mnist/train.py --out "$OUT/ckpts" --epochs 20 ${data_root_args[@]+"${data_root_args[@]}"}
  log_time train "$t"
fi

# 2. Head: init + epochs 1..10 (half the budget, before any lr decay) + 2 TWA epochs,
#    against the full 20-epoch run (the paper's "100 + 10 vs 200" on CIFAR, scaled down).
t=$SECONDS
twa average "$OUT/ckpts" --range 0:11 --model "$MODEL" --data fashion-mnist ${data_root_args[@]+"${data_root_args[@]}"} \
  --epochs 2 --lr "$TWA_LR" --out "$OUT/head" --overwrite --json \
  > "$OUT/head.json" 2> >(tee "$OUT/head.log" >&2)
log_time head "$t"

# 3. Tail: epochs 11..20, starting from the last checkpoint with a smaller weight decay
#    (as the reference's tail runs).
t=$SECONDS
twa average "$OUT/ckpts" --range 11:21 --start last --wd 5e-5 --model "$MODEL" --data fashion-mnist \
  ${data_root_args[@]+"${data_root_args[@]}"} --epochs 2 --lr "$TWA_LR" --out "$OUT/tail" --overwrite --json \
  > "$OUT/tail.json" 2> >(tee "$OUT/tail.log" >&2)
log_time tail "$t"

# 4. The table.
python examples/fashion_mnist/summarize.py "$OUT" | tee "$OUT/summary.md"
