"""Experiment worlds shared by the benchmarks: synthetic data at the sizes of real models."""
