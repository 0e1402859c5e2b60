#!/usr/bin/env bash
# Run as: sbatch [-N NODES] [--gpus-per-node G] slurm/pretrain.sh jobs/<job>.yaml [key=value ...]
# (from the repository root). Starts Ray across the allocation and runs every stage of the job;
# on preemption (SIGUSR1, 120 s before the end) it checkpoints and requeues itself. The #SBATCH
# lines below are defaults: sbatch command-line options override them. See slurm/README.md.
#SBATCH --job-name=launcher-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
exec "${LAUNCHER_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/ray_job.sh" "$@"
