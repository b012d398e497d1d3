#!/bin/bash
# Train an l-DAE recipe on SLURM: N nodes x 8 GPUs, one torchrun per node, requeued after preemption.
#
#   sbatch --nodes 2 scripts/slurm_train.sh ldae_vit_b_in1k /shared/imagenet /shared/runs/ldae_b
#
# OUT must be on a file system every node sees (the checkpoints are written by the first process only, and every
# process reads them on resume). Two minutes before the time limit (or at a preemption notice) SLURM signals this
# script; it passes SIGTERM on to the training processes, which write a checkpoint at the next step boundary and
# exit (ldae-models exits 75 after such a checkpoint), and the job is requeued. A requeued job runs this script again:
# `--resume` continues from OUT/ckpt_last.pth, bit for bit as an uninterrupted run would.
#SBATCH --job-name=ldae
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
set -euo pipefail

RECIPE=${1:?usage: sbatch scripts/slurm_train.sh RECIPE DATA_ROOT OUT [extra ldae-models train flags]}
DATA_ROOT=${2:?data root (an ImageFolder with train/)}
OUT=${3:?output folder on a shared file system}
shift 3

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node 8 \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    -m ldae_models train --recipe "$RECIPE" --data-root "$DATA_ROOT" --out "$OUT" --resume "$@" &
SRUN_PID=$!

preempted=0
on_notice() {
    preempted=1
    echo "$(date): time limit or preemption notice: checkpointing at the next step, then requeueing"
    kill -TERM "$SRUN_PID" 2>/dev/null || true   # srun passes SIGTERM to torchrun, torchrun to every process
}
trap on_notice USR1 TERM

status=0
wait "$SRUN_PID" || status=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do  # a trap interrupts `wait`: wait for the checkpoint to be written
    wait "$SRUN_PID" || status=$?
done

if [ "$preempted" = 1 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
