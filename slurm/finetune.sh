#!/usr/bin/env bash
# Run as: sbatch [-N NODES] [--gpus-per-node G] slurm/finetune.sh jobs/<job>.yaml [key=value ...]
# (from the repository root). Fine-tuning jobs are shorter and smaller than pre-training: one node
# and 4 hours by default. Same behaviour as slurm/pretrain.sh (Ray across the allocation,
# checkpoint + requeue on SIGUSR1). The #SBATCH lines are defaults; sbatch options override them.
#SBATCH --job-name=launcher-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
exec "${LAUNCHER_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/ray_job.sh" "$@"
