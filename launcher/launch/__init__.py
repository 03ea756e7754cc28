"""The login node's side: pre-flight, rendering, the stage pipeline and its jobs, progress, and the
executors that run jobs (local processes or SLURM through submitit)."""
