"""Attention kernels: one entry point (`api.attention`), a reference, Pallas backends."""

from mmjax.kernels.attention.api import AttentionBackend, attention, default_backend

__all__ = ["AttentionBackend", "attention", "default_backend"]
