"""The on-disk contract of a run: the run dir's paths, its manifest and records, locks, atomic
publishing, and checkpoint completion markers."""
