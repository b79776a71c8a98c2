"""Normalisation layers, always computed in float32 whatever the activation dtype."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _lead(v: jax.Array, ndim: int) -> jax.Array:
  """A [D] vector shaped [1, ..., 1, D] to broadcast against an ndim-rank activation."""
  return v.reshape((1,) * (ndim - 1) + v.shape)


class RMSNorm(nn.Module):
  """LLaMA's RMSNorm: x / sqrt(mean(x^2) + eps) * scale (scale initialised to 1)."""

  eps: float = 1e-6
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps) * _lead(scale, x.ndim)
    return y.astype(jnp.dtype(self.dtype))


class LayerNorm(nn.Module):
  """LayerNorm with optional bias, statistics in float32."""

  eps: float = 1e-5
  use_bias: bool = True
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * _lead(scale, x.ndim)
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,), jnp.float32)
      y = y + _lead(bias, x.ndim)
    return y.astype(jnp.dtype(self.dtype))
