"""A LLaMA-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) that can carry
Flamingo's gated cross-attention before every n-th layer.

Dimension letters: B batch, T length, S cache length, D width, H heads, G key/value
heads, K head dim, V vocabulary, N images, L latents, Dm media width.

Parameters (names chosen so that ``flamingo.param_labels`` and the converters are rename
tables): ``embed`` {``embedding`` [V, D]}; ``layers_{i}`` {``attn_norm``, ``attn``
{``query``, ``key``, ``value``, ``out``}, ``mlp_norm``, ``mlp`` {``gate_proj``,
``up_proj``, ``down_proj``}}; ``xattn_{i}`` (a ``GatedXAttnDense`` run just before LM layer
i, for i = n-1, 2n-1, ... exactly as open_flamingo's ``FlamingoLMMixin.init_flamingo``
places them: ``(i + 1) % cross_attn_every_n_layers == 0``); ``norm``; ``lm_head``
{``kernel`` [D, V]} unless the embeddings are tied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.attention import Attention, init_cache
from mmjax.layers.embed import Embed
from mmjax.layers.linear import dense
from mmjax.layers.mlp import SwiGLU
from mmjax.layers.norms import RMSNorm


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
  # Rematerialise each LM layer in the backward pass (saves activation memory when
  # training; no effect on the forward values).
  remat: bool = False


def xattn_layer_indices(config: DecoderConfig) -> tuple[int, ...]:
  """The LM layers preceded by a GatedXAttnDense: i with (i + 1) % n == 0 (open_flamingo)."""
  n = config.cross_attn_every_n_layers
  if n < 0:
    raise ValueError(f"cross_attn_every_n_layers={n}; expected >= 0 (0: no cross-attention)")
  if n == 0:
    return ()
  return tuple(i for i in range(config.depth) if (i + 1) % n == 0)


def xattn_config(config: DecoderConfig):
  """The GatedXAttnConfig of the decoder's cross-attention layers."""
  from mmjax.models.gated_xattn import GatedXAttnConfig  # pylint: disable=g-import-not-at-top
  return GatedXAttnConfig(
      width=config.width,
      media_width=config.media_width,
      num_heads=config.xattn_num_heads,
      head_dim=config.xattn_head_dim,
      ff_mult=config.xattn_ff_mult,
      only_attend_immediate_media=config.only_attend_immediate_media,
      dtype=config.dtype,
      attention_backend=config.attention_backend,
  )


def init_decoder_cache(config: DecoderConfig, batch: int, length: int) -> dict:
  """An empty self-attention cache: {"layers_{i}": {"key", "value": [B, S, G, K]}}."""
  if length > config.max_length:
    raise ValueError(f"cache length {length} exceeds max_length={config.max_length}")
  return {f"layers_{i}": init_cache(batch, length, config.num_kv_heads, config.head_dim,
                                    jnp.dtype(config.dtype))
          for i in range(config.depth)}


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(attn_norm(x)), then + mlp(mlp_norm(x)). Returns (x, cache)."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None):
    c = self.config
    h = RMSNorm(eps=c.norm_eps, dtype=c.dtype, name="attn_norm")(x)
    h, cache = Attention(
        num_heads=c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads,
        rope_theta=c.rope_theta, dtype=c.dtype, backend=c.attention_backend, name="attn",
    )(h, causal=True, positions=positions, cache=cache)
    x = x + h
    h = RMSNorm(eps=c.norm_eps, dtype=c.dtype, name="mlp_norm")(x)
    x = x + SwiGLU(mlp_dim=c.mlp_dim, dtype=c.dtype, name="mlp")(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, cache


class Decoder(nn.Module):
  """Token ids [B, T] -> float32 logits [B, T, V], with optional media cross-attention."""

  config: DecoderConfig

  def setup(self):
    c = self.config
    self.embed = Embed(c.vocab_size, c.width, dtype=c.dtype)
    layer_cls = nn.remat(DecoderLayer) if c.remat else DecoderLayer
    self.layers = [layer_cls(c) for _ in range(c.depth)]
    xattn_indices = xattn_layer_indices(c)
    if xattn_indices:
      from mmjax.models.gated_xattn import GatedXAttnDense  # pylint: disable=g-import-not-at-top
      xc = xattn_config(c)
      # A dict attribute names its modules xattn_{i}: i is the LM layer they precede.
      self.xattn = {i: GatedXAttnDense(xc) for i in xattn_indices}
    self.norm = RMSNorm(eps=c.norm_eps, dtype=c.dtype)
    if not c.tie_embeddings:
      self.lm_head = dense(c.vocab_size, ("embed", "vocab"), dtype=c.dtype)

  def compute_media_kv(self, media: jax.Array) -> dict:
    """Every cross-attention layer's media keys/values, computed once per image.

    Args:
      media: Float[B, N, L, Dm] resampled latents.

    Returns:
      {"xattn_{i}": {"key", "value": [B, N*L, H, K]}} for each cross-attention layer.
    """
    return {f"xattn_{i}": self.xattn[i].compute_media_kv(media)
            for i in xattn_layer_indices(self.config)}

  def __call__(
      self,
      input_ids: jax.Array,
      *,
      image_index: jax.Array | None = None,
      media: jax.Array | None = None,
      media_kv: Mapping[str, dict] | Sequence[dict] | None = None,
      positions: jax.Array | None = None,
      cache: dict | None = None,
  ) -> tuple[jax.Array, dict | None]:
    """Logits float32 [B, T, V] and the updated cache (None without one).

    Args:
      input_ids: Int[B, T].
      image_index: Int[B, T], number of <image> tokens at or before each token (0: none
        yet); needed by the cross-attention layers.
      media: Float[B, N, L, Dm] latents; or instead
      media_kv: the output of ``compute_media_kv`` (a dict keyed ``xattn_{i}``, or a
        list in layer order), so generation does not recompute the media projections.
      positions: Int[B, T] absolute positions (RoPE and the causal mask); default
        0..T-1.
      cache: {"layers_{i}": {"key", "value": [B, S, G, K]}} from ``init_decoder_cache``;
        the new keys/values are written at ``positions``.
    """
    c = self.config
    b, t = input_ids.shape
    xattn_indices = xattn_layer_indices(c)
    if xattn_indices:
      if (media is None) == (media_kv is None):
        raise ValueError(
            f"the decoder has cross-attention layers {xattn_indices}: give exactly one of"
            f" media and media_kv (got media={media is not None}, media_kv={media_kv is not None})")
      if image_index is None:
        raise ValueError("the decoder has cross-attention layers: image_index [B, T] is required")
      if image_index.shape != (b, t):
        raise ValueError(f"image_index has shape {image_index.shape}; expected {(b, t)}")
      if media_kv is not None and not isinstance(media_kv, Mapping):
        media_kv = list(media_kv)
        if len(media_kv) != len(xattn_indices):
          raise ValueError(
              f"media_kv has {len(media_kv)} entries; expected {len(xattn_indices)} (one per"
              f" cross-attention layer {xattn_indices})")
        media_kv = {f"xattn_{i}": kv for i, kv in zip(xattn_indices, media_kv)}
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is not None and len(cache) != c.depth:
      raise ValueError(f"cache has {len(cache)} layers; expected {c.depth}")

    x = self.embed(input_ids)
    new_cache = {} if cache is not None else None
    for i, layer in enumerate(self.layers):
      if i in xattn_indices:
        if media_kv is not None:
          x = self.xattn[i](x, image_index, media_kv=media_kv[f"xattn_{i}"])
        else:
          x = self.xattn[i](x, image_index, media=media)
      layer_cache = None if cache is None else cache[f"layers_{i}"]
      x, layer_cache = layer(x, positions, layer_cache)
      if cache is not None:
        new_cache[f"layers_{i}"] = layer_cache
    x = self.norm(x)
    if c.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x).astype(jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits, new_cache
