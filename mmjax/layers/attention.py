"""Self-attention with query/key/value/out projections around the one attention API.

The attention itself (masking, softmax, the choice of XLA or a Pallas kernel) is
``mmjax.kernels.attention.attention``; this module owns the projections, rotary
embeddings and the decode-time key/value cache. Cross-attention modules (the resampler,
the gated cross-attention) call :func:`dot_product_attention` with their own projections.

Dimension letters: B batch, T query length, S key length, D width, H heads,
G key/value heads, K head dim.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels.attention import api
from mmjax.layers.linear import dense
from mmjax.layers.norms import LayerNorm
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
  # LLaMA-3.1 frequency scaling (factor, low_freq_factor, high_freq_factor,
  # original_max_length), or None.
  rope_llama3: tuple[float, float, float, int] | None = None
  # ALiBi (MPT): per-head linear biases with this maximum, or None.
  alibi_bias_max: float | None = None
  # Each query sees only keys fewer than this many positions back (Mistral), or None.
  sliding_window: int | None = None
  # Clamp the query/key/value projections to [-clip_qkv, clip_qkv] (MPT), or None.
  clip_qkv: float | None = None
  # LayerNorms on the projected queries and keys, ``query_norm`` and ``key_norm``: "head" over
  # each head's K dims, shared by the heads (Persimmon's qk_layernorm); "width" over all H*K
  # (G*K) at once (MosaicGPT's attn_qk_ln); None: none. Their epsilon, and whether they have a bias.
  qk_norm: str | None = None
  qk_norm_eps: float = 1e-5
  qk_norm_bias: bool = True
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
    # Without positions they are the indices; the attention is told so (None), which lets the
    # XLA path cut causal self-attention into blocks.
    indices = positions is None and cache is None
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q = dense((h, k), ("embed", "heads", "kv"), use_bias=self.use_bias, dtype=self.dtype, name="query")(x)
    key = dense((g, k), ("embed", "kv_heads", "kv"), use_bias=self.use_bias, dtype=self.dtype, name="key")(x)
    value = dense((g, k), ("embed", "kv_heads", "kv"), use_bias=self.use_bias, dtype=self.dtype, name="value")(x)
    if self.clip_qkv is not None:
      q, key, value = (jnp.clip(y, -self.clip_qkv, self.clip_qkv) for y in (q, key, value))
    if self.qk_norm is not None:
      q = self._qk_norm(q, "query_norm")
      key = self._qk_norm(key, "key_norm")
    if self.rope_theta is not None:
      q = _partial_rope(q, positions, self.rope_theta, self.rotary_fraction, self.rope_llama3)
      key = _partial_rope(key, positions, self.rope_theta, self.rotary_fraction, self.rope_llama3)
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
        query_positions=None if indices else positions,
        key_positions=None if indices else key_positions,
        query_segment_ids=segment_ids,
        key_segment_ids=key_segment_ids,
        sliding_window=self.sliding_window,
        alibi_slopes=None if self.alibi_bias_max is None else jnp.asarray(alibi_slopes(h, self.alibi_bias_max)),
        backend=self.backend,
    )
    out_bias = self.use_bias if self.out_bias is None else self.out_bias
    y = dense(d, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=out_bias, dtype=self.dtype,
              name="out")(out)
    return y, cache

  def _qk_norm(self, x: jax.Array, name: str) -> jax.Array:
    """x [B, T, N, K] normed over K ("head") or over N*K ("width")."""
    if self.qk_norm not in ("head", "width"):
      raise ValueError(f"qk_norm={self.qk_norm!r}; expected 'head', 'width' or None")
    norm = LayerNorm(eps=self.qk_norm_eps, use_bias=self.qk_norm_bias, dtype=self.dtype, name=name)
    if self.qk_norm == "head":
      return norm(x)
    return norm(x.reshape(x.shape[:2] + (-1,))).reshape(x.shape)


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> np.ndarray:
  """ALiBi's per-head slopes (Press et al. 2022, as MPT generalises them to any head count):
  for n = the next power of two >= num_heads, slope i (1-based) is 2^(-i * bias_max / n);
  when num_heads is not a power of two the odd-indexed slopes come first, then the even ones,
  cut to num_heads. Float32 [num_heads]."""
  n = 1 << max(0, math.ceil(math.log2(num_heads)))
  slopes = 2.0 ** (-np.arange(1, n + 1, dtype=np.float64) * (bias_max / n))
  if n != num_heads:
    slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes.astype(np.float32)


def _partial_rope(x: jax.Array, positions: jax.Array, theta: float, fraction: float, llama3=None) -> jax.Array:
  """RoPE over the first round(fraction * K) dimensions of x [B, T, H, K] (the frequencies are
  those of a head of that many dimensions, as HF's partial rotary computes them)."""
  k = x.shape[-1]
  rot = int(round(fraction * k))
  if rot == k:
    return rope(x, positions, theta, llama3)
  if rot % 2 or not 0 < rot < k:
    raise ValueError(f"rotary_fraction={fraction} of head dim {k} rotates {rot} dimensions; expected an even "
                     f"number in (0, {k}]")
  return jnp.concatenate([rope(x[..., :rot], positions, theta, llama3), x[..., rot:]], axis=-1)


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
