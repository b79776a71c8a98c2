"""The XLA attention reference: written for clarity, it is the oracle of every kernel.

Dimension letters: B batch, T query length, S key length, H query heads, G key/value
heads (H is a multiple of G), K head dim.

One mask language serves every attention in the zoo. A query may attend to a key iff
all of the following that are given hold:

- ``causal``:   ``key_positions[s] <= query_positions[t]``;
- segments:     ``query_segment_ids[t] == key_segment_ids[s]`` (packed sequences);
- media:        the Flamingo image mask. ``query_image_index[t]`` is the number of
                ``<image>`` tokens at or before token t (0: no image yet);
                ``key_image_ids[s]`` is the 1-based image a key (a latent) belongs to.
                With ``only_attend_immediate_media`` a token sees the keys of image
                ``query_image_index[t]`` only, otherwise those of every image up to it.
                A token with index 0 sees nothing.
- ``sliding_window`` W (with ``causal``): ``query_positions[t] - key_positions[s] < W``,
                so each query sees itself and the W - 1 positions before it (Mistral's
                window, as transformers masks it).

``alibi_slopes`` [H] (ALiBi, MPT) adds ``slopes[h] * (key_positions[s] - query_positions[t])``
to the logits of head h, in float32, before the mask (positions default to the indices, as
for ``causal``). Within a query row this differs from MPT's ``slope * (s - S + 1)`` by a
constant only, which softmax ignores.

A query row with no allowed key produces zeros (not the uniform average a large negative
bias would give).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def default_positions(batch, query_length, key_length, query_positions=None, key_positions=None):
  """The positions given, or the indices 0..T-1 and 0..S-1 for those that are None."""
  if query_positions is None:
    query_positions = jnp.broadcast_to(jnp.arange(query_length, dtype=jnp.int32), (batch, query_length))
  if key_positions is None:
    key_positions = jnp.broadcast_to(jnp.arange(key_length, dtype=jnp.int32), (batch, key_length))
  return query_positions, key_positions


def allowed_mask(
    batch: int,
    query_length: int,
    key_length: int,
    *,
    causal: bool = False,
    query_positions: jax.Array | None = None,
    key_positions: jax.Array | None = None,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    query_image_index: jax.Array | None = None,
    key_image_ids: jax.Array | None = None,
    only_attend_immediate_media: bool = True,
    sliding_window: int | None = None,
) -> jax.Array:
  """Bool[B, T, S]: which keys each query may attend to (see the module docstring)."""
  mask = jnp.ones((batch, query_length, key_length), dtype=bool)
  if sliding_window is not None and not causal:
    raise ValueError(f"sliding_window={sliding_window} needs causal=True")
  if causal:
    query_positions, key_positions = default_positions(batch, query_length, key_length,
                                                       query_positions, key_positions)
    mask &= key_positions[:, None, :] <= query_positions[:, :, None]
    if sliding_window is not None:
      mask &= query_positions[:, :, None] - key_positions[:, None, :] < sliding_window
  if query_segment_ids is not None:
    mask &= query_segment_ids[:, :, None] == key_segment_ids[:, None, :]
  if query_image_index is not None:
    q_img = query_image_index[:, :, None]
    k_img = key_image_ids[:, None, :]
    if only_attend_immediate_media:
      mask &= k_img == q_img
    else:
      mask &= k_img <= q_img
    mask &= q_img > 0
  return mask


def attention_reference(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    causal: bool = False,
    query_positions: jax.Array | None = None,
    key_positions: jax.Array | None = None,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    query_image_index: jax.Array | None = None,
    key_image_ids: jax.Array | None = None,
    only_attend_immediate_media: bool = True,
    sliding_window: int | None = None,
    alibi_slopes: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Float[B, T, H, K] from query [B, T, H, K] and key, value [B, S, G, K].

  Logits and softmax are computed in float32 whatever the input dtype; the output has
  the dtype of ``value``.
  """
  b, t, h, k = query.shape
  s, g = key.shape[1], key.shape[2]
  if scale is None:
    scale = k**-0.5
  mask = allowed_mask(
      b, t, s,
      causal=causal,
      query_positions=query_positions,
      key_positions=key_positions,
      query_segment_ids=query_segment_ids,
      key_segment_ids=key_segment_ids,
      query_image_index=query_image_index,
      key_image_ids=key_image_ids,
      only_attend_immediate_media=only_attend_immediate_media,
      sliding_window=sliding_window,
  )
  # Grouped-query attention: query head h reads key/value head h // (H // G).
  grouped = query.reshape(b, t, g, h // g, k)
  logits = jnp.einsum("BTGRK,BSGK->BGRTS", grouped, key, preferred_element_type=jnp.float32)
  logits = logits.astype(jnp.float32) * scale
  if alibi_slopes is not None:
    qp, kp = default_positions(b, t, s, query_positions, key_positions)
    distance = (kp[:, None, :] - qp[:, :, None]).astype(jnp.float32)  # [B, T, S]
    slopes = alibi_slopes.astype(jnp.float32).reshape(g, h // g)
    logits = logits + slopes[None, :, :, None, None] * distance[:, None, None]
  mask = mask[:, None, None, :, :]
  logits = jnp.where(mask, logits, -jnp.inf)
  # The max only keeps exp() in range; it cancels out of the result, so no gradient.
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  # Rows with no allowed key: weights are all 0; dividing by 1 keeps them 0.
  probs = weights / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("BGRTS,BSGK->BTGRK", probs.astype(value.dtype), value,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, k).astype(value.dtype)
