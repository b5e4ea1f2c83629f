"""Launching the pipeline: the local or Slurm chain of stage jobs, the submitit task, status and follow."""
