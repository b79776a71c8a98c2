"""Pallas kernels and the XLA references they are tested against."""
