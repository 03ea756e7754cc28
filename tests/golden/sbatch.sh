#!/bin/bash

# Parameters
#SBATCH --account=lab_x.y
#SBATCH --constraint='[a100|h100]&ib*2'
#SBATCH --job-name=tiny.v2-a_b
#SBATCH --mem=64G
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --open-mode=append
#SBATCH --output={RUN_DIR}/logs/slurm/%j_0_log.out
#SBATCH --partition=gpu-a.1,debug_2
#SBATCH --qos=normal,high
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=10
#SBATCH --wckey=submitit

# setup
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_TELEMETRY=1
export EVIL='$(touch pwned); `touch pwned` '"'"'single'"'"' "double" $HOME \'

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output {RUN_DIR}/logs/slurm/%j_%t_log.out --kill-on-bad-exit=1 {PYTHON} -u -m submitit.core._submit {RUN_DIR}/logs/slurm


# teardown
launcher_rc=$?
{PYTHON} -m launcher.launch.executors.requeue {RUN_DIR} "$launcher_rc"
exit "$launcher_rc"