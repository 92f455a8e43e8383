#!/usr/bin/env bash
# VP2O RL of the tiny MoE on one machine with torchrun (CPU + gloo here, GPUs + NCCL where present).
# Usage: NPROC=2 EP=2 bash examples/torchrun/train_tiny.sh [extra dotted overrides]
set -euo pipefail
NPROC=${NPROC:-2}
EP=${EP:-2}
TP=${TP:-1}
PP=${PP:-1}
ALGO=${ALGO:-vp2o}
OUT=${OUT:-runs/tiny_${ALGO}_np${NPROC}}

PARALLEL_ARGS=(parallel.tp=${TP} parallel.pp=${PP} parallel.ep=${EP})
RL_ARGS=(rl.algo=${ALGO})

torchrun --nproc-per-node "${NPROC}" --no-python \
  vp2o train --config examples/configs/tiny_cpu.yaml --out "${OUT}" "${PARALLEL_ARGS[@]}" "${RL_ARGS[@]}" "$@"
