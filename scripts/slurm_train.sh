#!/bin/bash
# Train an l-DAE recipe on SLURM: srun starts one process per task (one per GPU), on as many nodes as the job has;
# a time-limit notice checkpoints the run at the step reached and requeues the job, which resumes exactly.
#
#   sbatch --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 --cpus-per-task 8 \
#       scripts/slurm_train.sh ldae_vit_b_in1k /shared/imagenet /shared/runs/ldae_b [more ldae-models train flags]
#   sbatch --test-only ...        # the same request, checked by the scheduler without submitting it
#
# Processes per node: NPROC_PER_NODE if set, else the allocation's --ntasks-per-node, else its GPUs per node, else 1.
# OUT must be on a file system every node sees (the first process writes the checkpoints, every process reads them on
# resume). Environment: PYTHON (default python3) runs ldae_models; MASTER_PORT (default: a free port of the first
# node) is the processes' rendezvous.
#
# Stopping: the scheduler signals this script (USR1) some minutes before the time limit (--signal below); the script
# sends SIGTERM to the training step (scancel --signal TERM, never to srun itself, which would kill the step); every
# process writes a checkpoint at the next agreed step and exits with status 75; the script requeues the job, and the
# requeued job continues from the checkpoint (--resume). A SIGTERM to the script itself (a user's scancel, an
# administrator's requeue, a preemption) is passed on the same way, so the run keeps its progress, but the script never
# requeues it: a cancelled job stays cancelled, a requeued or preempted one is requeued by the scheduler.
#SBATCH --job-name=ldae
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
set -uo pipefail

RECIPE=${1:?usage: sbatch [resources] scripts/slurm_train.sh RECIPE DATA_ROOT OUT [more ldae-models train flags]}
DATA_ROOT=${2:?data root (an ImageFolder with train/)}
OUT=${3:?output folder on a shared file system}
shift 3
PYTHON=${PYTHON:-python3}

say() { echo "$(date '+%F %T') slurm_train.sh: $*"; }
fail() { echo "$(date '+%F %T') slurm_train.sh: error: $*" >&2; exit 2; }

# -- what this job was given, checked before anything starts ---------------------------------------------------------
NODES=${SLURM_JOB_NUM_NODES:?not inside a SLURM job: submit this script with sbatch}
GPUS=${SLURM_GPUS_ON_NODE:-0}
NPROC=${NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-}}
if [ -z "$NPROC" ]; then NPROC=$(( GPUS > 0 ? GPUS : 1 )); fi
TASKS=$(( NPROC * NODES ))
if [ "${SLURM_NTASKS:-1}" -lt "$TASKS" ]; then
    fail "$NPROC process(es) per node on $NODES node(s) need $TASKS tasks, but the allocation has ${SLURM_NTASKS:-1}: " \
         "submit with --ntasks-per-node $NPROC (or set NPROC_PER_NODE to what it has)"
fi
if [ "$GPUS" -gt 0 ] && [ "$NPROC" -gt "$GPUS" ]; then
    fail "$NPROC process(es) per node but $GPUS GPU(s) per node: one process per GPU (--ntasks-per-node $GPUS, or " \
         "--gpus-per-node $NPROC)"
fi
case " $* " in
    *" --device cuda "* | *" --device=cuda "*)
        [ "$GPUS" -gt 0 ] || fail "--device cuda, but this job has no GPU: submit with --gpus-per-node N" ;;
esac

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
export MASTER_ADDR MASTER_PORT
say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NODES node(s) x $NPROC process(es), $GPUS GPU(s) per" \
    "node, rendezvous $MASTER_ADDR:$MASTER_PORT"

# -- the training step: one process per task, its rank from SLURM --------------------------------------------------
srun --ntasks "$TASKS" --ntasks-per-node "$NPROC" --kill-on-bad-exit=1 \
    bash -c 'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE='"$NPROC"' \
             exec "$0" -m ldae_models train "$@"' \
    "$PYTHON" --recipe "$RECIPE" --data-root "$DATA_ROOT" --out "$OUT" --resume "$@" &
SRUN_PID=$!

notice=0
stop_step() {  # SIGTERM to the training step's processes (not to srun, not to this script)
    scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true
}
on_notice() {
    notice=1
    say "time-limit notice: the run checkpoints at its next step and stops; the job is then requeued"
    stop_step
}
on_term() {
    say "SIGTERM: the run checkpoints at its next step and stops (the scheduler decides what follows)"
    stop_step
}
trap on_notice USR1
trap on_term TERM

status=0
wait "$SRUN_PID" || status=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do  # a trap interrupts `wait`: wait for the checkpoint to be written
    wait "$SRUN_PID" || status=$?
done
say "training step ended with status $status"

# requeued after a notice when the step stopped for it: 75 (checkpointed), or 143 (SIGTERM reached it while Python was
# still starting, before its handler: nothing to keep yet)
if [ "$notice" = 1 ] && { [ "$status" = 75 ] || [ "$status" = 143 ]; }; then
    say "requeueing job $SLURM_JOB_ID: it resumes from $OUT"
    scontrol requeue "$SLURM_JOB_ID" || say "requeue refused (an administrator's requeue or a cancel came first)"
fi
exit "$status"
