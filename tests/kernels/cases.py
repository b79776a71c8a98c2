"""Attention cases shared by the kernel tests: inputs, masks, and the reference check.

Dimension letters: B batch, T query length, S key length, H heads, G kv heads, K head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels.attention import api, reference


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention call: shapes and which parts of the mask language it uses."""

  name: str
  batch: int = 1
  query_length: int = 16
  key_length: int = 16
  heads: int = 2
  kv_heads: int = 1
  head_dim: int = 16
  causal: bool = False
  segments: bool = False
  images: int = 0  # images per row of a Flamingo cross-attention (0: none)
  latents: int = 0  # keys per image
  only_attend_immediate_media: bool = True
  decode: bool = False  # one query at a given position over a KV cache
  sliding_window: int | None = None  # with causal: keys fewer than this many positions back
  alibi: bool = False  # random per-head ALiBi slopes


def make_inputs(case: Case, dtype=jnp.float32, seed: int = 0) -> tuple[tuple, dict]:
  """((query, key, value), mask keyword arguments) of a case, random but reproducible."""
  rng = np.random.default_rng(seed)
  b, t, s = case.batch, case.query_length, case.key_length
  if case.images:
    s = case.images * case.latents
  shape_q = (b, t, case.heads, case.head_dim)
  shape_k = (b, s, case.kv_heads, case.head_dim)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype)
             for shape in (shape_q, shape_k, shape_k))
  kwargs: dict = dict(causal=case.causal)
  if case.decode:
    # Cache slots past the current position are unwritten and must be masked.
    kwargs["query_positions"] = jnp.asarray(rng.integers(0, s, (b, 1)), jnp.int32)
    kwargs["key_positions"] = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  if case.segments:
    # Ragged packing: 1 to 3 segments per row with random boundaries, same for q and k
    # when self-attention.
    ids = []
    for _ in range(b):
      cuts = np.sort(rng.choice(np.arange(1, t), size=rng.integers(0, 3), replace=False))
      row = np.zeros(t, np.int32)
      for c in cuts:
        row[c:] += 1
      ids.append(row)
    kwargs["query_segment_ids"] = jnp.asarray(np.stack(ids))
    kwargs["key_segment_ids"] = jnp.asarray(np.stack(ids))
  if case.images:
    # Row 0: text before the first image, then every image; other rows: random
    # <image> positions (some rows see fewer images than they have).
    index = []
    for row in range(b):
      starts = np.sort(rng.choice(np.arange(1, t), size=case.images, replace=False))
      if row == 1:
        starts = starts[:1]
      index.append(np.searchsorted(starts, np.arange(t), side="right").astype(np.int32))
    kwargs["query_image_index"] = jnp.asarray(np.stack(index))
    kwargs["key_image_ids"] = jnp.broadcast_to(
        jnp.repeat(jnp.arange(1, case.images + 1, dtype=jnp.int32), case.latents), (b, s))
    kwargs["only_attend_immediate_media"] = case.only_attend_immediate_media
  if case.sliding_window is not None:
    kwargs["sliding_window"] = case.sliding_window
  if case.alibi:
    # Steeper than MPT's 2^-8h/H so that over these short sequences a wrong distance or
    # slope (a head mixed up under sharding, a sign) moves the result well past tolerance.
    kwargs["alibi_slopes"] = jnp.asarray(rng.uniform(0.05, 0.5, case.heads), jnp.float32)
  return (q, k, v), kwargs


def rel_err(actual, expected) -> float:
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def outputs_and_grads(fn, qkv, cotangent):
  """(out, (dq, dk, dv)) of fn at qkv, pulled back from ``cotangent``."""
  out, pullback = jax.vjp(fn, *qkv)
  return out, pullback(cotangent)


def check_backend_matches_reference(case: Case, backend: str, dtype=jnp.float32,
                                    tolerance: float | None = None, block_sizes=None,
                                    mesh=None) -> None:
  """Asserts the backend's output and dq, dk, dv equal the reference's."""
  if tolerance is None:
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  qkv, kwargs = make_inputs(case, dtype)
  rng = np.random.default_rng(1)
  cotangent = jnp.asarray(rng.standard_normal(qkv[0].shape), dtype)

  kernel = jax.jit(lambda q, k, v: api.attention(
      q, k, v, **kwargs, backend=backend, interpret=True, block_sizes=block_sizes,
      mesh=mesh))
  # The oracle runs in float32 on the same (possibly bf16-rounded) inputs.
  oracle = lambda q, k, v: reference.attention_reference(q, k, v, **kwargs)
  upcast = tuple(x.astype(jnp.float32) for x in qkv)
  out, grads = outputs_and_grads(kernel, qkv, cotangent)
  want_out, want_grads = outputs_and_grads(oracle, upcast, cotangent.astype(jnp.float32))
  errors = {"out": rel_err(out, want_out)}
  errors.update({name: rel_err(g, w) for name, g, w in zip(("dq", "dk", "dv"), grads,
                                                           want_grads)})
  assert out.dtype == dtype
  bad = {name: e for name, e in errors.items() if not e <= tolerance}
  assert not bad, f"{case.name} on {backend} ({jnp.dtype(dtype).name}): {bad} > {tolerance}"
