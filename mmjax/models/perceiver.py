"""The Perceiver Resampler: a fixed number of learned latents read any number of patches.

A port of ``open_flamingo.src.helpers.PerceiverResampler`` (itself from lucidrains'
flamingo-pytorch): in every layer the latents attend over the concatenation of the (layer
normalised) media features and the latents themselves, then pass a feed-forward block, both
with residuals; a final LayerNorm. Optional learned frame embeddings (videos) and media-time
embeddings (position of the image in the example) are added to the media features first.

Parameters (the converter ``mmjax.families.flamingo.convert_bridge`` is a rename table over them):
``latents`` [L, D]; ``frame_embs`` [F_max, D] if ``max_num_frames``; ``media_time_embs``
[N_max, D] if ``max_num_media``; ``layers_{i}`` {``attn`` {``norm_media``, ``norm_latents``,
``to_q`` [D, H, K], ``to_kv`` [D, 2, H, K], ``to_out`` [H, K, D]}, ``ff`` {``norm``,
``fc1`` [D, ff_mult*D], ``fc2``}}; ``norm``.

Dimension letters: B batch, N images, F frames, P patches, L latents, D width, H heads,
K head dim.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.attention import dot_product_attention
from mmjax.layers.linear import dense
from mmjax.layers.norms import LayerNorm


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


class FeedForward(nn.Module):
  """Flamingo's feed-forward: LayerNorm ``norm``, ``fc1`` (no bias), exact GELU, ``fc2``.

  The same block (``open_flamingo.src.helpers.FeedForward``) serves the resampler and the
  gated cross-attention.
  """

  mlp_dim: int
  norm_eps: float = 1e-5
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = LayerNorm(eps=self.norm_eps, dtype=self.dtype, name="norm")(x)
    h = dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(h)
    # torch nn.GELU() is the exact (erf) GELU.
    h = jax.nn.gelu(h, approximate=False)
    h = nn.with_logical_constraint(h, ("batch",) + (None,) * (h.ndim - 2) + ("mlp",))
    return dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class PerceiverAttention(nn.Module):
  """Latents [B', L, D] attend over concat(norm_media(x), norm_latents(latents)) [B', P+L, D]."""

  num_heads: int
  head_dim: int
  norm_eps: float = 1e-5
  dtype: str = "float32"
  backend: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
    d = latents.shape[-1]
    h, k = self.num_heads, self.head_dim
    x = LayerNorm(eps=self.norm_eps, dtype=self.dtype, name="norm_media")(x)
    latents = LayerNorm(eps=self.norm_eps, dtype=self.dtype, name="norm_latents")(latents)
    q = dense((h, k), ("embed", "heads", "kv"), dtype=self.dtype, name="to_q")(latents)
    kv_input = jnp.concatenate([x, latents], axis=1)  # [B', P+L, D]
    kv = dense((2, h, k), ("embed", None, "heads", "kv"), dtype=self.dtype, name="to_kv")(kv_input)
    q = nn.with_logical_constraint(q, ("batch", "latents", "heads", "kv"))
    # Every latent sees every patch and every latent: no mask.
    out = dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], backend=self.backend)
    return dense(d, ("heads", "kv", "embed"), axis=(-2, -1), dtype=self.dtype, name="to_out")(out)


class PerceiverLayer(nn.Module):
  """One resampler layer: ``attn`` then ``ff``, each with a residual, on latents [B', L, D]."""

  config: PerceiverConfig

  @nn.compact
  def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
    cfg = self.config
    latents = latents + PerceiverAttention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, norm_eps=cfg.norm_eps, dtype=cfg.dtype,
        backend=cfg.attention_backend, name="attn")(x, latents)
    return latents + FeedForward(
        mlp_dim=cfg.ff_mult * cfg.width, norm_eps=cfg.norm_eps, dtype=cfg.dtype, name="ff")(latents)


class PerceiverResampler(nn.Module):
  """Float[B, N, F, P, D] media features -> Float[B, N, L, D] latents (L = num_latents)."""

  config: PerceiverConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if x.ndim != 5:
      raise ValueError(
          f"media features have shape {x.shape}; expected rank 5 [batch, images, frames, patches, width]")
    b, n, f, p, d = x.shape
    if d != cfg.width:
      raise ValueError(f"media features have width {d}; expected the resampler width {cfg.width}")
    if cfg.max_num_frames is not None and f > cfg.max_num_frames:
      raise ValueError(f"media have {f} frames; expected at most max_num_frames={cfg.max_num_frames}")
    if cfg.max_num_media is not None and n > cfg.max_num_media:
      raise ValueError(f"{n} media per example; expected at most max_num_media={cfg.max_num_media}")

    # torch.randn initialisation, as the reference.
    randn = nn.initializers.normal(stddev=1.0)
    latents = self.param("latents", nn.with_logical_partitioning(randn, ("latents", "embed")),
                         (cfg.num_latents, d), jnp.float32)
    x = x.astype(dtype)
    if cfg.max_num_frames is not None:
      frame_embs = self.param("frame_embs", nn.with_logical_partitioning(randn, ("frames", "embed")),
                              (cfg.max_num_frames, d), jnp.float32)
      x = x + frame_embs[:f].astype(dtype).reshape(1, 1, f, 1, d)
    x = x.reshape(b, n, f * p, d)  # frames and patches are one set of keys
    if cfg.max_num_media is not None:
      media_time_embs = self.param(
          "media_time_embs", nn.with_logical_partitioning(randn, ("images", "embed")),
          (cfg.max_num_media, d), jnp.float32)
      x = x + media_time_embs[:n].astype(dtype).reshape(1, n, 1, d)
    x = nn.with_logical_constraint(x, ("batch", "images", "patches", "embed"))

    # Images are independent: fold them into the batch for the attention.
    x = x.reshape(b * n, f * p, d)
    lat = jnp.broadcast_to(latents.astype(dtype)[None], (b * n, cfg.num_latents, d))
    for i in range(cfg.depth):
      lat = PerceiverLayer(cfg, name=f"layers_{i}")(x, lat)
    lat = LayerNorm(eps=cfg.norm_eps, dtype=cfg.dtype, name="norm")(lat)
    lat = lat.reshape(b, n, cfg.num_latents, d)
    return nn.with_logical_constraint(lat, ("batch", "images", "latents", "embed"))
