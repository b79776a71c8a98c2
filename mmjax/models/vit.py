"""Vision Transformer towers (CLIP, SigLIP and friends).

Dimension letters: B batch, N images, H/W pixels, P patches, D width.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  # Input resolution the position embeddings are laid out for (square images).
  image_size: int = 224
  # Side of a square patch, in pixels.
  patch_size: int = 14
  # Token width D.
  width: int = 1024
  # Number of transformer blocks.
  depth: int = 24
  num_heads: int = 16
  # Hidden width of each block's MLP.
  mlp_dim: int = 4096
  # Prepend a learned CLS token (CLIP yes, SigLIP no).
  class_token: bool = True
  # 'learned' (interpolated when the resolution differs) or 'sincos2d'.
  posemb: str = "learned"
  # LayerNorm before the first block (CLIP's pre_layrnorm).
  pre_norm: bool = True
  # LayerNorm after the last block.
  post_norm: bool = True
  # 'quick_gelu' (OpenAI CLIP), 'gelu_tanh' (SigLIP) or 'gelu'.
  activation: str = "quick_gelu"
  # Bias in the patch-embedding convolution (CLIP: no, SigLIP: yes).
  patch_bias: bool = False
  norm_eps: float = 1e-5
  # Which block's output is returned: -1 the last, -2 the penultimate (BLIP-2, LLaVA).
  output_layer: int = -1
  # Per-channel normalisation applied to uint8 pixels scaled to [0, 1].
  image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
  image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
  # Compute dtype of activations and matmuls; parameters stay float32.
  dtype: str = "float32"
  # mmjax.kernels.attention.AttentionBackend value, or None for the platform default.
  attention_backend: str | None = None
