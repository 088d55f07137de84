#!/bin/bash
# One device call: the reproduction runs at once (each line one process, its sigma x seed runs in one vmap), then bench.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1
T0=$(date +%s); STOP=$((T0 + ${SWEEP_S:-450}))
mkdir -p logs out
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch;print(torch.__version__)";
  lscpu | grep 'Model name'; nproc; } > logs/machine.txt 2>&1
run() {  # NAME FLAGS...: a run set, retried without compile if it fails (not for a timeout or a divergence)
  local name=$1; shift
  timeout $((STOP - $(date +%s))) python3 train.py --threads 1 "$@" --out-dir "out/$name/{pe}-{init_std:g}-s{seed}" --resume \
    > "logs/$name.log" 2>&1
  local rc=$?
  echo "exit $rc at $(( $(date +%s) - T0 )) s" >> "logs/$name.log"
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 3 ] && [ $(date +%s) -lt $((STOP - 60)) ]; then
    timeout $((STOP - $(date +%s))) python3 train.py --threads 1 "$@" --out-dir "out/$name/{pe}-{init_std:g}-s{seed}" --resume \
      --no-compile >> "logs/$name.log" 2>&1
    echo "retry exit $? at $(( $(date +%s) - T0 )) s" >> "logs/$name.log"
  fi
}
P="--preset paper-short"; S2="--init-stds 0.2,2 --seeds 0,1,2"
run paper $P --init-stds 0.2,2 --seeds 0,1,2,3,4 &
run paper-sigma $P --init-stds 0.1,0.5,1,1.5 --seeds 0,1 &
run paper-sinnd $P --pe sinnd --seeds 0,1,2 &
run readout-cls $P $S2 --readout cls &
run no-out-gelu $P $S2 --no-mlp-out-gelu &
run attn-linear $P $S2 --attn-init linear &
run data-generated $P $S2 --data generated &
run data-generated-noholdout $P $S2 --data generated --no-holdout &
run readout-query $P $S2 --readout query &
run pe-input $P $S2 --pe-layers input &
run embed-002 $P $S2 --embed-std 0.02 &
run lr-cosine $P $S2 --lr 3e-4 --min-lr-ratio 0.1 &
run wd-01 $P $S2 --weight-decay 0.1 &
run random-pe $P $S2 --pe random &
run pe-wd10 $P --init-stds 2 --seeds 0,1,2 --pe-weight-decay 10 &
run ours-lstnn $S2 --data lstnn --max-epochs 200 --eval-epochs 25 &
wait
echo "sweep done at $(( $(date +%s) - T0 )) s" >> logs/machine.txt
left=$(( ${TOTAL_S:-560} - ($(date +%s) - T0) - 25 ))
[ $left -gt 40 ] && timeout $left python3 bench.py --models 8 --repeats 3 --threads 1 > logs/bench.txt 2>&1
find out -name 'summary.json' -o -name 'metrics.jsonl' | tar czf "$OUT/runs.tgz" -T - logs
