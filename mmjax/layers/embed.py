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


def _check_whole_patches(h: int, w: int, p: int) -> None:
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")


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
    _check_whole_patches(h, w, p)
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


def conv_stem_channels(patch_size: int, width: int) -> list[int]:
  """Output channels of each stride-2 convolution of a `ConvStem` (before its 1x1)."""
  n = patch_size.bit_length() - 1
  if patch_size < 2 or 2**n != patch_size:
    raise ValueError(f"patch_size={patch_size} with stem='conv': expected a power of 2 >= 2 "
                     "(each 3x3 convolution of the stem halves the resolution)")
  return [max(width // 2 ** (n - 1 - i), 1) for i in range(n)]


class ConvStem(nn.Module):
  """Pixels [B, H, W, C] -> [B, P, D] tokens on the grid of ``PatchEmbed(patch_size)``.

  The convolutional stem of Xiao et al. 2021 ("Early convolutions help transformers see
  better"): log2(patch_size) 3x3 convolutions of stride 2, each halving the resolution
  (channels doubling up to ``width``, GELU after each), then a 1x1 convolution to ``width``.
  Overlapping 3x3 windows see across patch borders, which a patchify stem cannot, and
  from scratch the tower learns local form (edges, corners) in far fewer steps. Parameters
  ``conv_{i}_kernel`` [3, 3, C_in, C_out], ``conv_{i}_bias``, ``proj_kernel`` [C, D], ``proj_bias``.
  No pretrained CLIP or SigLIP tower has one: for towers trained here.
  """

  patch_size: int
  width: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    b, h, w, _ = pixels.shape
    p = self.patch_size
    _check_whole_patches(h, w, p)
    dtype = jnp.dtype(self.dtype)
    x = pixels.astype(dtype)
    for i, channels in enumerate(conv_stem_channels(p, self.width)):
      kernel = self.param(
          f"conv_{i}_kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
          (3, 3, x.shape[-1], channels), jnp.float32)
      bias = self.param(f"conv_{i}_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (channels,), jnp.float32)
      x = jax.lax.conv_general_dilated(
          x, kernel.astype(dtype), window_strides=(2, 2), padding=((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = nn.gelu(x + bias.astype(dtype)[None, None, None, :], approximate=False)
    kernel = self.param("proj_kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", "embed")),
                        (x.shape[-1], self.width), jnp.float32)
    bias = self.param("proj_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (self.width,), jnp.float32)
    out = jnp.einsum("BHWC,CD->BHWD", x, kernel.astype(dtype)) + bias.astype(dtype)[None, None, None, :]
    return out.reshape(b, (h // p) * (w // p), self.width)
