"""The attention entry point: validates inputs, then dispatches to a backend.

Every attention in the zoo calls :func:`attention`; see ``reference.py`` for the mask
semantics, which every backend reproduces exactly.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from mmjax.kernels.attention import reference


class AttentionBackend(enum.Enum):
  XLA = "xla"
  PALLAS_TPU = "pallas_tpu"
  PALLAS_GPU = "pallas_gpu"
  CUDNN = "cudnn"


def default_backend() -> AttentionBackend:
  """The backend used when none is given. XLA until the kernels are measured faster."""
  return AttentionBackend.XLA


def _check_ids(name: str, ids: jax.Array | None, shape: tuple[int, int]) -> None:
  if ids is None:
    return
  if ids.shape != shape:
    raise ValueError(f"{name} has shape {ids.shape}, expected {shape}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name} has dtype {ids.dtype}, expected an integer dtype")


def validate(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    query_positions=None,
    key_positions=None,
    query_segment_ids=None,
    key_segment_ids=None,
    query_image_index=None,
    key_image_ids=None,
) -> None:
  """Raises ValueError naming the first input whose shape or dtype is wrong."""
  if query.ndim != 4:
    raise ValueError(f"query has shape {query.shape}, expected [batch, length, heads, head_dim]")
  if key.ndim != 4 or value.shape != key.shape:
    raise ValueError(
        f"key {key.shape} and value {value.shape} must share one [batch, length, kv_heads, head_dim] shape")
  b, t, h, k = query.shape
  _, s, g, kk = key.shape
  if key.shape[0] != b or kk != k:
    raise ValueError(f"key {key.shape} does not match query {query.shape} in batch or head_dim")
  if h % g:
    raise ValueError(f"query has {h} heads, not a multiple of the {g} key/value heads")
  if (query_segment_ids is None) != (key_segment_ids is None):
    raise ValueError("query_segment_ids and key_segment_ids must be given together")
  if (query_image_index is None) != (key_image_ids is None):
    raise ValueError("query_image_index and key_image_ids must be given together")
  _check_ids("query_positions", query_positions, (b, t))
  _check_ids("key_positions", key_positions, (b, s))
  _check_ids("query_segment_ids", query_segment_ids, (b, t))
  _check_ids("key_segment_ids", key_segment_ids, (b, s))
  _check_ids("query_image_index", query_image_index, (b, t))
  _check_ids("key_image_ids", key_image_ids, (b, s))


def attention(
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
    scale: float | None = None,
    backend: AttentionBackend | str | None = None,
) -> jax.Array:
  """Float[B, T, H, K]: attention of query [B, T, H, K] over key, value [B, S, G, K]."""
  validate(
      query, key, value,
      query_positions=query_positions,
      key_positions=key_positions,
      query_segment_ids=query_segment_ids,
      key_segment_ids=key_segment_ids,
      query_image_index=query_image_index,
      key_image_ids=key_image_ids,
  )
  backend = default_backend() if backend is None else AttentionBackend(backend)
  if backend is not AttentionBackend.XLA:
    raise NotImplementedError(f"attention backend {backend.value!r} is not implemented yet")
  return reference.attention_reference(
      query, key, value,
      causal=causal,
      query_positions=query_positions,
      key_positions=key_positions,
      query_segment_ids=query_segment_ids,
      key_segment_ids=key_segment_ids,
      query_image_index=query_image_index,
      key_image_ids=key_image_ids,
      only_attend_immediate_media=only_attend_immediate_media,
      scale=scale,
  )
