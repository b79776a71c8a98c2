"""The Perceiver Resampler: a fixed number of learned latents read any number of patches.

Dimension letters: B batch, N images, F frames, P patches, L latents, D width.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
  # Width D of the media features (the vision tower's width) and of the latents.
  width: int = 1024
  depth: int = 6
  num_heads: int = 8
  head_dim: int = 64
  # Number of output latents per image, whatever the number of patches.
  num_latents: int = 64
  # Feed-forward hidden width = ff_mult * width.
  ff_mult: int = 4
  # If set, learned per-frame embeddings for videos of up to this many frames.
  max_num_frames: int | None = None
  # If set, learned media-time embeddings for up to this many images per example.
  max_num_media: int | None = None
  norm_eps: float = 1e-5
  dtype: str = "float32"
  attention_backend: str | None = None
