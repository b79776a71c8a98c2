"""Self-attention with query/key/value/out projections around the one attention API.

The attention itself (masking, softmax, the choice of XLA or a Pallas kernel) is
``mmjax.kernels.attention.attention``; this module owns the projections, rotary
embeddings and the decode-time key/value cache. Cross-attention modules (the resampler,
the gated cross-attention) call :func:`dot_product_attention` with their own projections.

Dimension letters: B batch, T query length, S key length, D width, H heads,
G key/value heads, K head dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.kernels.attention import api
from mmjax.layers.linear import dense
from mmjax.layers.posemb import rope

dot_product_attention = api.attention


def init_cache(batch: int, length: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> dict:
  """An empty key/value cache {"key", "value"}: [B, S, G, K] each."""
  shape = (batch, length, num_kv_heads, head_dim)
  return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


class Attention(nn.Module):
  """Multi-head (or grouped-query) self-attention: ``query``, ``key``, ``value``, ``out``.

  With ``cache`` ({"key", "value"} of [B, S, G, K]) the new keys and values are written
  at ``positions`` and the queries attend over the whole cache, causally by position, so
  unwritten slots (later positions) are never seen. Returns (output, updated cache).
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  use_bias: bool = False
  # Bias on the output projection; defaults to use_bias.
  out_bias: bool | None = None
  # RoPE base frequency, or None for no rotary embedding.
  rope_theta: float | None = None
  # The leading fraction of each head's dimensions that RoPE rotates (GPT-NeoX's
  # rotary_pct, Phi's partial_rotary_factor); the rest pass through.
  rotary_fraction: float = 1.0
  dtype: str = "float32"
  backend: str | None = None

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      *,
      causal: bool = False,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      cache: dict | None = None,
  ) -> tuple[jax.Array, dict | None]:
    b, t, d = x.shape
    h, k = self.num_heads, self.head_dim
    g = self.num_kv_heads or h
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q = dense((h, k), ("embed", "heads", "kv"), use_bias=self.use_bias, dtype=self.dtype, name="query")(x)
    key = dense((g, k), ("embed", "kv_heads", "kv"), use_bias=self.use_bias, dtype=self.dtype, name="key")(x)
    value = dense((g, k), ("embed", "kv_heads", "kv"), use_bias=self.use_bias, dtype=self.dtype, name="value")(x)
    if self.rope_theta is not None:
      q = _partial_rope(q, positions, self.rope_theta, self.rotary_fraction)
      key = _partial_rope(key, positions, self.rope_theta, self.rotary_fraction)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))

    key_positions = positions
    key_segment_ids = segment_ids
    if cache is not None:
      cache = _write_cache(cache, key, value, positions)
      key, value = cache["key"], cache["value"]
      s = key.shape[1]
      key_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
      if segment_ids is not None:
        raise ValueError("segment_ids cannot be combined with a key/value cache")

    out = dot_product_attention(
        q, key, value,
        causal=causal or cache is not None,
        query_positions=positions,
        key_positions=key_positions,
        query_segment_ids=segment_ids,
        key_segment_ids=key_segment_ids,
        backend=self.backend,
    )
    out_bias = self.use_bias if self.out_bias is None else self.out_bias
    y = dense(d, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=out_bias, dtype=self.dtype,
              name="out")(out)
    return y, cache


def _partial_rope(x: jax.Array, positions: jax.Array, theta: float, fraction: float) -> jax.Array:
  """RoPE over the first round(fraction * K) dimensions of x [B, T, H, K] (the frequencies are
  those of a head of that many dimensions, as HF's partial rotary computes them)."""
  k = x.shape[-1]
  rot = int(round(fraction * k))
  if rot == k:
    return rope(x, positions, theta)
  if rot % 2 or not 0 < rot < k:
    raise ValueError(f"rotary_fraction={fraction} of head dim {k} rotates {rot} dimensions; expected an even "
                     f"number in (0, {k}]")
  return jnp.concatenate([rope(x[..., :rot], positions, theta), x[..., rot:]], axis=-1)


def _write_cache(cache: dict, key: jax.Array, value: jax.Array, positions: jax.Array) -> dict:
  """Writes key/value [B, T, G, K] into the cache at positions [B, T] (per example)."""
  s = cache["key"].shape[1]
  # One-hot scatter keeps every shape static and works for per-example positions.
  onehot = (positions[:, :, None] == jnp.arange(s, dtype=positions.dtype)[None, None, :])  # [B,T,S]
  written = jnp.any(onehot, axis=1)[:, :, None, None]  # [B,S,1,1]
  def write(old, new):
    scattered = jnp.einsum("BTS,BTGK->BSGK", onehot.astype(new.dtype), new.astype(old.dtype))
    return jnp.where(written, scattered.astype(old.dtype), old)
  return {"key": write(cache["key"], key), "value": write(cache["value"], value)}
