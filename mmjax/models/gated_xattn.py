"""GATED XATTN-DENSE: text tokens cross-attend to image latents through tanh gates.

Dimension letters: B batch, T text length, N images, L latents, D width.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GatedXAttnConfig:
  # Width of the text stream (the LM's hidden size).
  width: int = 4096
  # Width of the media latents (the resampler's width).
  media_width: int = 1024
  num_heads: int = 8
  head_dim: int = 64
  ff_mult: int = 4
  # True: token t sees only the latents of image image_index[t]; False: every image up to it.
  only_attend_immediate_media: bool = True
  norm_eps: float = 1e-5
  dtype: str = "float32"
  attention_backend: str | None = None
