"""Token and patch embeddings."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embed(nn.Module):
  """A [V, D] table: ``embedding``; ``attend`` gives tied output logits."""

  vocab_size: int
  width: int
  dtype: str = "float32"

  def setup(self):
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("vocab", "embed")),
        (self.vocab_size, self.width), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Float[B, T, D] from int ids [B, T]."""
    out = jnp.take(self.embedding, ids, axis=0).astype(jnp.dtype(self.dtype))
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))

  def attend(self, x: jax.Array) -> jax.Array:
    """Float32[B, T, V] logits from x [B, T, D] with the table as output projection."""
    return jnp.einsum("BTD,VD->BTV", x, self.embedding.astype(x.dtype),
                      preferred_element_type=jnp.float32)


class PatchEmbed(nn.Module):
  """Non-overlapping patches of [B, H, W, C] pixels -> [B, P, D] tokens: ``kernel``, ``bias``.

  A patch-sized, patch-strided convolution written as a reshape and one matmul, so its
  kernel [p, p, C, D] is laid out as torch's Conv2d weight [D, C, p, p] transposed.
  """

  patch_size: int
  width: int
  use_bias: bool = True
  dtype: str = "float32"

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    b, h, w, c = pixels.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
        (p, p, c, self.width), jnp.float32)
    dtype = jnp.dtype(self.dtype)
    patches = pixels.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // p) * (w // p), p, p, c).astype(dtype)
    out = jnp.einsum("BPijC,ijCD->BPD", patches, kernel.astype(dtype))
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (self.width,), jnp.float32)
      out = out + bias.astype(dtype)[None, None, :]
    return out
