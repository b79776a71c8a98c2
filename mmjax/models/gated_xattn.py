"""GATED XATTN-DENSE: text tokens cross-attend to image latents through tanh gates.

A port of ``open_flamingo.src.helpers.GatedCrossAttentionBlock``:

  y = x + tanh(attn_gate) * to_out(attention(to_q(norm(x)), to_kv(media)))
  out = y + tanh(ff_gate) * ff(y)

with both gates initialised to 0, so a freshly initialised block is the identity.

The media mask comes from ``image_index`` [B, T] = cumsum(ids == <image>) (inclusive, as the
reference's ``text_time = media_locations.cumsum(-1)``: an ``<image>`` token already sees its
own image) and the 1-based image id of every key (latent l of image n has id n + 1). With
``only_attend_immediate_media`` token t sees the latents of image ``image_index[t]`` only;
otherwise those of every image up to it. A token with ``image_index == 0`` (text before the
first image) gets a ZERO cross-attention output.

Relation to the reference's masking:
- only_attend_immediate_media=True: identical (the reference zeroes the attention weights of
  such tokens, ``text_without_media_mask``).
- only_attend_immediate_media=False: the reference does not zero them, and a fully masked
  row of its ``masked_fill(-max)`` softmax becomes a uniform average over every latent of
  every image, a future image included. mmjax gives zero instead (a token must not see
  images that follow it); every other token matches the reference.
- Cached decoding (the reference's ``use_cached_media``: every new token attends as if after
  the last image) is ``image_index`` = number of images so far for the new tokens.

Parameters: ``attn`` {``norm``, ``to_q`` [D, H, K], ``to_kv`` [Dm, 2, H, K], ``to_out``
[H, K, D]}, ``attn_gate`` [1], ``ff`` {``norm``, ``fc1``, ``fc2``}, ``ff_gate`` [1].

Dimension letters: B batch, T text length, N images, L latents, D width, Dm media width,
H heads, K head dim.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.attention import dot_product_attention
from mmjax.layers.linear import dense
from mmjax.layers.norms import LayerNorm
from mmjax.models.perceiver import FeedForward


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


def media_key_image_ids(batch: int, num_images: int, num_latents: int) -> jax.Array:
  """Int[B, N*L]: the 1-based image id of every media key (latent l of image n -> n + 1)."""
  ids = jnp.repeat(jnp.arange(1, num_images + 1, dtype=jnp.int32), num_latents)
  return jnp.broadcast_to(ids[None, :], (batch, num_images * num_latents))


class MaskedCrossAttention(nn.Module):
  """Text [B, T, D] attends to media keys/values [B, N*L, H, K] under the image mask."""

  config: GatedXAttnConfig

  def setup(self):
    cfg = self.config
    h, k = cfg.num_heads, cfg.head_dim
    self.norm = LayerNorm(eps=cfg.norm_eps, dtype=cfg.dtype)
    self.to_q = dense((h, k), ("embed", "heads", "kv"), dtype=cfg.dtype)
    self.to_kv = dense((2, h, k), ("embed", None, "heads", "kv"), dtype=cfg.dtype)
    self.to_out = dense(cfg.width, ("heads", "kv", "embed"), axis=(-2, -1), dtype=cfg.dtype)

  def compute_media_kv(self, media: jax.Array) -> dict:
    """Media [B, N, L, Dm] -> {"key", "value": [B, N*L, H, K], "key_image_ids": [B, N*L]}."""
    cfg = self.config
    if media.ndim != 4:
      raise ValueError(f"media have shape {media.shape}; expected rank 4 [batch, images, latents, width]")
    b, n, l, dm = media.shape
    if dm != cfg.media_width:
      raise ValueError(f"media have width {dm}; expected media_width={cfg.media_width}")
    kv = self.to_kv(media.astype(jnp.dtype(cfg.dtype)).reshape(b, n * l, dm))  # [B, N*L, 2, H, K]
    axes = ("batch", None, "heads", "kv")
    return {
        "key": nn.with_logical_constraint(kv[:, :, 0], axes),
        "value": nn.with_logical_constraint(kv[:, :, 1], axes),
        "key_image_ids": media_key_image_ids(b, n, l),
    }

  def __call__(self, x: jax.Array, image_index: jax.Array, media_kv: dict) -> jax.Array:
    cfg = self.config
    q = self.to_q(self.norm(x))
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    key_image_ids = media_kv["key_image_ids"]
    out = dot_product_attention(
        q, media_kv["key"], media_kv["value"],
        query_image_index=image_index.astype(jnp.int32),
        key_image_ids=key_image_ids.astype(jnp.int32),
        only_attend_immediate_media=cfg.only_attend_immediate_media,
        backend=cfg.attention_backend,
    )
    return self.to_out(out)


class GatedXAttnDense(nn.Module):
  """Float[B, T, D] text, Int[B, T] image_index, media or media_kv -> Float[B, T, D]."""

  config: GatedXAttnConfig

  def setup(self):
    cfg = self.config
    self.attn = MaskedCrossAttention(cfg)
    gate_init = nn.with_logical_partitioning(nn.initializers.zeros, (None,))
    self.attn_gate = self.param("attn_gate", gate_init, (1,), jnp.float32)
    self.ff = FeedForward(mlp_dim=cfg.ff_mult * cfg.width, norm_eps=cfg.norm_eps, dtype=cfg.dtype)
    self.ff_gate = self.param("ff_gate", gate_init, (1,), jnp.float32)

  def compute_media_kv(self, media: jax.Array) -> dict:
    """Media [B, N, L, Dm] -> {"key", "value": [B, N*L, H, K], "key_image_ids": Int[B, N*L]}.

    Computed once per set of images and reused at every decode step
    (``module.apply(params, media, method=GatedXAttnDense.compute_media_kv)``).
    """
    return self.attn.compute_media_kv(media)

  def __call__(
      self,
      x: jax.Array,
      image_index: jax.Array,
      *,
      media: jax.Array | None = None,
      media_kv: dict | None = None,
      num_latents: int | None = None,
  ) -> jax.Array:
    """``media_kv`` without "key_image_ids" needs ``num_latents`` (latents per image)."""
    cfg = self.config
    if (media is None) == (media_kv is None):
      raise ValueError("GatedXAttnDense needs exactly one of media and media_kv; got "
                       f"media={'set' if media is not None else None}, "
                       f"media_kv={'set' if media_kv is not None else None}")
    if x.ndim != 3 or x.shape[-1] != cfg.width:
      raise ValueError(f"text activations have shape {x.shape}; expected [batch, length, {cfg.width}]")
    if image_index.shape != x.shape[:2]:
      raise ValueError(f"image_index has shape {image_index.shape}; expected {x.shape[:2]}")
    if media is not None:
      media_kv = self.compute_media_kv(media)
    elif "key_image_ids" not in media_kv:
      if num_latents is None:
        raise ValueError("media_kv has no 'key_image_ids'; pass num_latents (latents per image)")
      b, s = media_kv["key"].shape[:2]
      if s % num_latents:
        raise ValueError(f"media_kv holds {s} keys, not a multiple of num_latents={num_latents}")
      media_kv = dict(media_kv, key_image_ids=media_key_image_ids(b, s // num_latents, num_latents))

    dtype = jnp.dtype(cfg.dtype)
    x = x.astype(dtype)
    attn_gate = jnp.tanh(self.attn_gate).astype(dtype).reshape(1, 1, 1)
    ff_gate = jnp.tanh(self.ff_gate).astype(dtype).reshape(1, 1, 1)
    x = x + attn_gate * self.attn(x, image_index, media_kv)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = x + ff_gate * self.ff(x)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
