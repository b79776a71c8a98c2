"""Position embeddings: rotary (RoPE), fixed 2-D sin-cos, and resizing learned grids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def llama3_scaled(inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                  original_max_length: int) -> np.ndarray:
  """LLaMA-3.1's RoPE frequency scaling (Meta's published rule): wavelengths longer than
  ``original_max_length / low_freq_factor`` are stretched ``factor`` times, those shorter than
  ``original_max_length / high_freq_factor`` kept, and those between interpolated linearly in
  ``original_max_length / wavelength``."""
  if not high_freq_factor > low_freq_factor:
    raise ValueError(f"rope high_freq_factor={high_freq_factor} <= low_freq_factor={low_freq_factor}; "
                     "expected high > low")
  wavelength = 2 * np.pi / inv_freq
  t = (original_max_length / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
  blend = np.clip(t, 0.0, 1.0)  # 0: long wavelengths (scaled), 1: short ones (kept)
  return (1.0 - blend) * inv_freq / factor + blend * inv_freq


def rope_frequencies(k: int, theta: float = 10000.0, llama3: tuple[float, float, float, int] | None = None
                     ) -> np.ndarray:
  """The K/2 inverse frequencies of RoPE over a head of K dims, float64; ``llama3`` = (factor,
  low_freq_factor, high_freq_factor, original_max_length) applies :func:`llama3_scaled`."""
  inv_freq = 1.0 / (theta ** (np.arange(0, k, 2, dtype=np.float64) / k))
  return inv_freq if llama3 is None else llama3_scaled(inv_freq, *llama3)


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0,
         llama3: tuple[float, float, float, int] | None = None) -> jax.Array:
  """Rotary embedding of x [B, T, H, K] at integer positions [B, T].

  Uses the half-split layout of HF LLaMA (dimension i pairs with i + K/2), so imported
  q/k projections need no permutation. Angles are computed in float32. ``llama3``: see
  :func:`rope_frequencies`.
  """
  k = x.shape[-1]
  if k % 2:
    raise ValueError(f"RoPE needs an even head dim, got {k}")
  inv_freq = rope_frequencies(k, theta, llama3)
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
