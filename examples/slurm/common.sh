# Shared body of the vp2o sbatch scripts (sourced; the script sets CONFIG, OUT, NNODES, NTASKS, NGPU,
# PARALLEL_ARGS, VP2O_ARGS, LOG_ARGS first). What it does:
#   * one srun task per torchrun agent (NTASKS, normally one per node) -> torchrun with NGPU ranks each,
#     c10d rendezvous on the first node of the allocation (MASTER_PORT derived from the job id);
#   * container flags only when CONTAINER is set (pyxis/enroot: --container-image, --container-mounts);
#   * `vp2o train --resume`: a requeued or preempted job continues from its newest checkpoint
#     (a fresh OUT starts from rl.policy);
#   * stop before the time limit: slurm sends USR1 to this script (#SBATCH --signal=B:USR1@SECONDS), the
#     trap has slurm send SIGURG to the job step's processes (megatron_vp2o/launch/signals.py says why URG),
#     every rank finishes its step, writes a checkpoint and exits;
#     then the job requeues itself (REQUEUE=1, the default) and continues where it stopped. torchrun waits
#     SAVE_GRACE_S seconds (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) for its workers to finish the checkpoint.
set -euo pipefail

cd "${VP2O_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SAVE_GRACE_S:-300}
export WANDB_RUN_ID=${WANDB_RUN_ID:-vp2o-${SLURM_JOB_ID:-local}}  # a requeued job keeps its id: same wandb run
VP2O=${VP2O:-vp2o}

LAUNCH_ARGS=(--nnodes "${NTASKS}" --nproc-per-node "${NGPU}" --max-restarts 0
             --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id "${SLURM_JOB_ID:-vp2o}"
             --no-python)
SRUN_ARGS=(--ntasks "${NTASKS}" --ntasks-per-node $(( (NTASKS + NNODES - 1) / NNODES )) --kill-on-bad-exit=1)
if [[ -n "${CONTAINER:-}" ]]; then
  SRUN_ARGS+=(--container-image "${CONTAINER}" --container-workdir "$(pwd)")
  if [[ -n "${MOUNTS:-}" ]]; then SRUN_ARGS+=(--container-mounts "${MOUNTS}"); fi
fi
TRAIN_ARGS=(train --config "${CONFIG}" --out "${OUT}" --resume)

STOP=0
forward_stop() {  # SIGURG to every process of the step (ignored by all but the ranks: torchrun and
  if (( STOP )); then return; fi  # megatron's checkpoint helper live on; srun would kill the step on SIGTERM)
  STOP=1
  echo "vp2o sbatch: stop signal: asking every rank to checkpoint at the end of its step" >&2
  scancel --signal=URG "${SLURM_JOB_ID}" || true
}
trap forward_stop USR1 TERM

echo "vp2o sbatch: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: ${NTASKS} agents x ${NGPU} ranks," \
     "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, out ${OUT}" >&2
srun "${SRUN_ARGS[@]}" torchrun "${LAUNCH_ARGS[@]}" "${VP2O}" "${TRAIN_ARGS[@]}" \
  "${PARALLEL_ARGS[@]}" "${VP2O_ARGS[@]}" "${LOG_ARGS[@]}" "$@" &
STEP_PID=$!
RC=0
while true; do  # `wait` returns early when a trapped signal arrives; wait again until the step is gone
  wait "${STEP_PID}" && RC=0 || RC=$?
  kill -0 "${STEP_PID}" 2>/dev/null || break
done
if (( STOP )) && [[ "${REQUEUE:-1}" == 1 ]]; then
  echo "vp2o sbatch: requeueing job ${SLURM_JOB_ID} to continue from its checkpoint" >&2
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "${RC}"
