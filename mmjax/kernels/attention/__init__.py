"""Attention kernels: one entry point (`api.attention`), a reference, Pallas backends."""

from mmjax.kernels.attention.api import (AttentionBackend, attention, default_backend,
                                         force_interpret)
from mmjax.kernels.attention.block_sizes import BlockSizes

__all__ = ["AttentionBackend", "BlockSizes", "attention", "default_backend", "force_interpret"]
