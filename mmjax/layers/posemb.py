"""Position embeddings: rotary (RoPE), fixed 2-D sin-cos, and resizing learned grids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary embedding of x [B, T, H, K] at integer positions [B, T].

  Uses the half-split layout of HF LLaMA (dimension i pairs with i + K/2), so imported
  q/k projections need no permutation. Angles are computed in float32.
  """
  k = x.shape[-1]
  if k % 2:
    raise ValueError(f"RoPE needs an even head dim, got {k}")
  inv_freq = 1.0 / (theta ** (np.arange(0, k, 2, dtype=np.float64) / k))
  angles = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq, jnp.float32)[None, None, :]  # [B,T,K/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : k // 2], x32[..., k // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10000.0) -> np.ndarray:
  """Fixed 2-D sin-cos embeddings [grid_h * grid_w, width], row-major over the grid."""
  if width % 4:
    raise ValueError(f"sincos_2d needs a width divisible by 4, got {width}")
  y, x = np.mgrid[:grid_h, :grid_w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 if width > 4 else 1))
  y = y.reshape(-1)[:, None] * omega[None, :]
  x = x.reshape(-1)[:, None] * omega[None, :]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)
