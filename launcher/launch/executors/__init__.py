"""Executors: where jobs run. base.py is the interface; local.py (this machine) and slurm.py (a SLURM
cluster) implement it, each in its own file; factory.py is the one place that picks one by name."""
