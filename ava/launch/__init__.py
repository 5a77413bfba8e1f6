"""Launching runs on clusters: SLURM batch scripts rendered from launch/slurm/ and submitted with sbatch."""

from ava.launch.sbatch import JobRequest, SbatchError, render, submit, template_path

__all__ = ["JobRequest", "SbatchError", "render", "submit", "template_path"]
