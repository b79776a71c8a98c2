"""Tile sizes of the Pallas attention kernels, in a frozen dataclass that checks itself.

``block_q`` x ``block_kv`` is the tile of the forward kernel; the backward kernels (one for
dK/dV, one for dQ) have their own pair because they keep more tiles live at once. A
kernel clamps each size to the (padded) sequence length, so one ``BlockSizes`` serves
short and long sequences alike.
"""

from __future__ import annotations

import dataclasses

# Mosaic tiles 32-bit arrays in (8 sublanes, 128 lanes): a query tile must be a multiple
# of 8 rows; a key tile is the lane dimension of the logits, so a multiple of 128 unless
# it covers the whole (short) key sequence.
TPU_SUBLANES = 8
TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query x key tile sizes of the forward and backward kernels."""

  block_q: int = 128
  block_kv: int = 128
  block_q_bwd: int = 128
  block_kv_bwd: int = 128

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"BlockSizes.{field.name}={value!r}, expected a positive int")

  @classmethod
  def for_tpu(cls, generation: str | None = None) -> "BlockSizes":
    """Defaults per TPU generation (``'v5e'``, ``'v5p'``, ``'v6e'``, ...).

    v5e has 128x128 MXUs and 16 GiB of HBM per chip; v5p and v6e (256x256 MXUs on v6e)
    keep larger key tiles busy. These are starting points from the MXU shapes, not yet
    tuned on hardware (no TPU was available when they were written).
    """
    if generation is not None and generation.startswith(("v6", "tpu7")):
      return cls(block_q=256, block_kv=512, block_q_bwd=256, block_kv_bwd=256)
    if generation is not None and generation.startswith("v5p"):
      return cls(block_q=256, block_kv=256, block_q_bwd=128, block_kv_bwd=256)
    return cls(block_q=128, block_kv=256, block_q_bwd=128, block_kv_bwd=128)

  @classmethod
  def for_gpu(cls) -> "BlockSizes":
    """Defaults for the Triton lowering (Ampere/Hopper shared memory, 4-8 warps)."""
    return cls(block_q=64, block_kv=64, block_q_bwd=32, block_kv_bwd=64)

  def check_tpu(self, query_length: int, key_length: int) -> None:
    """Raises ValueError if these tiles cannot be lowered by Mosaic for these lengths."""
    for name in ("block_q", "block_q_bwd"):
      size = min(getattr(self, name), query_length)
      if size % TPU_SUBLANES and size != query_length:
        raise ValueError(
            f"BlockSizes.{name}={getattr(self, name)} (clamped to {size}) must be a "
            f"multiple of {TPU_SUBLANES} on TPU")
    for name in ("block_kv", "block_kv_bwd"):
      size = min(getattr(self, name), key_length)
      if size % TPU_LANES and size != key_length:
        raise ValueError(
            f"BlockSizes.{name}={getattr(self, name)} (clamped to {size}) must be a "
            f"multiple of {TPU_LANES} on TPU, or cover the whole key length {key_length}")

  def check_gpu(self) -> None:
    """Raises ValueError unless every tile is a power of two (Triton's requirement)."""
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value & (value - 1):
        raise ValueError(f"BlockSizes.{field.name}={value} must be a power of two on GPU")
