"""launcher: one YAML job spec, pre-training then fine-tuning, run locally, on Ray or on SLURM."""

__version__ = "0.1.0"
