#!/usr/bin/env bash
# The quickstart on a quiet and on a busy 2-core machine (docs/benchmarks.md §11):
#   bash benchmarks/cpu_threads.sh OUT          # OUT: a scratch folder for the runs
# the whole quickstart with cpu_threads=auto (the default) on the quiet machine; 300 steps with 2 threads
# and with 1, quiet, then beside a torch process that keeps both cores busy (a 256x256 matmul loop with
# torch's default threads), then cpu_threads=auto beside it; the whole quickstart beside it.
# Each line: what, wall seconds. Run it on a machine with nothing else running.
set -euo pipefail
out=${1:?usage: bash benchmarks/cpu_threads.sh OUT}
mkdir -p "$out"
cd "$(dirname "$0")/.."
short=(experiment=quickstart trainer.max_steps=300 trainer.val_check_interval=1000
       callbacks.checkpoint.every_n_train_steps=1000 '~callbacks.digits_accuracy' print_config=false)

run() {  # run NAME ARGS...: the wall time of one train.py run
    local name=$1; shift
    local start=$SECONDS
    python train.py "$@" hydra.run.dir="$out/$name" > "$out/$name.out" 2>&1
    echo "$name $((SECONDS - start)) s ($(grep -m1 'CPU threads' "$out/$name.out"))"
}

load() {  # another torch process computing on every core, until killed
    python -c "
import torch
a = torch.randn(256, 256)
while True:
    a = torch.tanh(a @ a)
" &
    hog=$!
    sleep 5
}

wait_quiet() {  # cpu_threads=auto reads the 1-minute load average: let it settle first
    for _ in $(seq 60); do
        awk '{exit !($1 < 0.3)}' /proc/loadavg && return
        sleep 10
    done
}

wait_quiet
run quiet-quickstart-auto experiment=quickstart print_config=false
OMP_NUM_THREADS=2 run quiet-300-threads2 "${short[@]}"
OMP_NUM_THREADS=1 run quiet-300-threads1 "${short[@]}"
load
OMP_NUM_THREADS=2 run loaded-300-threads2 "${short[@]}"
OMP_NUM_THREADS=1 run loaded-300-threads1 "${short[@]}"
run loaded-300-auto "${short[@]}"
run loaded-quickstart-auto experiment=quickstart print_config=false
kill $hog
