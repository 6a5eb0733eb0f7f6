"""Launchers: local, Slurm, Ray, mpirun."""
