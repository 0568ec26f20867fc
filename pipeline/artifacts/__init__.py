"""Artifacts on disk, the contract between steps: KFAC factor files and posterior directories."""
