"""A LLaMA-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) that can carry
Flamingo's gated cross-attention before every n-th layer.

Dimension letters: B batch, T length, D width, H heads, G key/value heads, K head dim,
V vocabulary.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int = 32000
  width: int = 4096
  depth: int = 32
  num_heads: int = 32
  # Key/value heads (grouped-query attention); equal to num_heads for plain MHA.
  num_kv_heads: int = 32
  head_dim: int = 128
  # Hidden width of the SwiGLU feed-forward.
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  # Share the embedding table with the output projection.
  tie_embeddings: bool = False
  # Longest sequence (prompt + generation) the model accepts.
  max_length: int = 2048
  # Insert a GatedXAttnDense before every n-th layer (layers n-1, 2n-1, ... as in
  # open_flamingo); 0 for a plain LM.
  cross_attn_every_n_layers: int = 0
  # Shape of each GatedXAttnDense (width is taken from `width`).
  xattn_num_heads: int = 8
  xattn_head_dim: int = 64
  xattn_ff_mult: int = 4
  only_attend_immediate_media: bool = True
  # Width of the media latents fed to the cross-attention.
  media_width: int = 1024
  dtype: str = "float32"
  attention_backend: str | None = None
