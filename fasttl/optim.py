"""Optimizers (filled in by the optimizer kernels)."""
