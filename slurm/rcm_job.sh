#!/bin/bash
# The body of the rCM sbatch scripts (sourced by slurm/*.sbatch after their #SBATCH lines and defaults):
# one torchrun per node through srun, c10d rendezvous on the first node, pre-emption turned into save + requeue.
#
# Environment (each optional unless the config needs it):
#   CONFIG         YAML config (default: the sbatch script's)
#   RUN_DIR        run folder (run_dir=...); a requeued job resumes from its checkpoints/latest
#   TEACHER DATA NEG   model.teacher / data.path / data.negative_text_embedding
#   GPUS_PER_NODE  processes per node (default: Slurm's GPUs on the node, else 8)
#   MASTER_PORT    rendezvous port on the first node (default 29500)
#   PYTHON         interpreter (default: python)
#   REQUEUE        1 (default): requeue the job after a pre-emption save; 0: just stop
#   RESEND         seconds between repeats of the forwarded SIGUSR1 while no worker on the first node listens
#                  for it yet (default 10)
# Arguments: config overrides (key.sub=value ...), passed to examples/pretrain_rcm.py.
#
# Pre-emption: `--signal=B:USR1@N` sends SIGUSR1 to this shell N s before the time limit (`scancel
# --signal=USR1 --batch JOB` does it at once). The trap sends SIGUSR1 to every process of the job step; the
# workers finish the iteration they are in, agree on stopping, save a checkpoint and exit; torchrun ignores the
# signal (it would end torchrun and its workers). Then this shell runs `scontrol requeue`: `--requeue` alone does
# not requeue a job that reached its time limit. N must cover one iteration plus a checkpoint save.
set -uo pipefail

# The trap comes first: Slurm sends the warning from a periodic check, which can fall in the first seconds of a job
# with a short limit, and SIGUSR1 without a trap ends this shell (bash's default action) and fails the job.
STOP=0
USR1_BIT=$(($(kill -l USR1) - 1))
worker_listens() {  # a process of this job's steps on this node catches SIGUSR1: a worker with the trainer's handler
    local pid mask
    for pid in $(scontrol listpids "$SLURM_JOB_ID" 2>/dev/null | awk '$3 ~ /^[0-9]+$/ {print $1}'); do
        mask=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$pid/status" 2>/dev/null)
        [ -n "$mask" ] && (( (16#$mask >> USR1_BIT) & 1 )) && return 0
    done
    return 1
}
forward_preemption() {
    [ "$STOP" = 1 ] && return  # once: srun may forward the same signal again
    STOP=1
    echo "SIGUSR1 ($(date -u '+%T') UTC): asking the workers to save a checkpoint and stop"
    # SIGUSR1 to every process of the job steps (not this shell), again every RESEND s until a worker on this node
    # has had it with its handler installed: workers still starting up ignore it (inherited from the task shell),
    # a warning they never see ends the job at its time limit, and one worker's request stops every rank (the
    # trainer agrees on it over all ranks). No more than that: a worker on its way out has Python's default action
    # back, and SIGUSR1 would kill it.
    ( while :; do
          listening=0
          worker_listens && listening=1
          scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null && [ "$listening" = 1 ] && break
          sleep "${RESEND:-10}"
          kill -0 $$ 2>/dev/null || break
      done ) &
}
trap forward_preemption USR1

cd "${REPO:-${SLURM_SUBMIT_DIR:-.}}"
PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# the address the other nodes reach the first one at (NodeAddr; the node name where it is the host name)
MASTER_ADDR=$(scontrol show node "$FIRST_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}
WORLD=$((NNODES * GPUS_PER_NODE))

ARGS=(--config "$CONFIG")
[ -n "${RUN_DIR:-}" ] && ARGS+=("run_dir=$RUN_DIR")
[ -n "${TEACHER:-}" ] && ARGS+=("model.teacher=$TEACHER")
[ -n "${DATA:-}" ] && ARGS+=("data.path=$DATA")
[ -n "${NEG:-}" ] && ARGS+=("data.negative_text_embedding=$NEG")
ARGS+=("$@")

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) [$SLURM_JOB_NODELIST] x $GPUS_PER_NODE" \
     "process(es) = world $WORLD; rendezvous $MASTER_ADDR:$MASTER_PORT; $(date -u '+%F %T') UTC"
# the resolved layout and its memory estimate, before any GPU is touched (never fatal here: the trainer checks)
"$PYTHON" tools/estimate_memory.py --brief --gpus "$WORLD" "${ARGS[@]}" || echo "(no memory estimate: see above)"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export PYTHONUNBUFFERED=1

# `trap '' USR1` in the task shell: torchrun inherits SIGUSR1 as ignored, the workers install their handler
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'trap "" USR1; exec "$@"' task \
    "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    examples/pretrain_rcm.py "${ARGS[@]}" &
SRUN_PID=$!
# `wait` returns early when the trap runs: wait again until srun has ended
rc=0
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID"
    rc=$?
done

if [ "$STOP" = 1 ] && [ "${REQUEUE:-1}" = 1 ]; then
    echo "workers stopped (exit $rc, $(date -u +%T) UTC); requeueing job $SLURM_JOB_ID: it resumes from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"  # ends this script
    exit 0
fi
exit "$rc"
