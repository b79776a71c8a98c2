"""Pallas GPU flash attention (Triton lowering): forward, dK/dV and dQ kernels, custom_vjp.

Dimension letters: B batch, T query length, S key length, H query heads, G key/value
heads (R = H // G), K head dim, C id columns.

Same semantics as ``tpu.py`` and ``reference.py``: the mask is rebuilt per tile from
integer ids, tiles with no allowed pair are skipped (decided from the min/max of the
ids of the two tiles, computed in-kernel; each program loops only over the window of
tiles that may be live, from ``masking.live_windows``), softmax statistics are float32 and a query
row with no allowed key outputs zeros. ALiBi is rebuilt inside the tile from the position
ids and the program's head slope (a one-element block of the [H] slopes; no gradient
flows to them). The kernels read [B, T, H, K] directly (no
transposes): a program owns one query tile of one head and loops over key tiles.

Why the Triton lowering and not Mosaic GPU: the Triton lowering runs on every GPU
generation JAX supports (Ampere included), accepts arbitrary element-wise masking code
written in jax.numpy, and runs in ``interpret=True`` mode on CPU, where this kernel is
tested. Mosaic GPU (``attention_mgpu.py`` in JAX) reaches FlashAttention-3 speed on
Hopper only, with warpgroup-level code and no masks; JAX deprecates the Triton lowering
from 0.11 but still ships it. No GPU was available when this was written, so the speed
of this kernel is unmeasured (see README.md); a Mosaic GPU port is the next step if the
measurement asks for it.

GQA: the dK/dV kernel runs one program per (query head, key tile) and writes float32
partial gradients [B, S, H, K] that XLA sums over the R heads of a group: linear
memory, full parallelism, no atomics.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mmjax.kernels.attention import flash_vjp
from mmjax.kernels.attention import masking
from mmjax.kernels.attention.block_sizes import BlockSizes

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b

# tl.dot needs tiles of at least 16 in every dimension.
_MIN_TILE = 16


@dataclasses.dataclass(frozen=True)
class _Config:
  spec: masking.MaskSpec
  scale: float
  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int
  interpret: bool


def _compiler_params(num_warps: int, num_stages: int):
  from jax.experimental.pallas import triton as pltriton  # only needed to compile for GPU
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _columns(ids_refs, cfg: _Config):
  """Splits the id refs into {name: query ref} and {name: key ref}."""
  names = cfg.spec.columns
  c = len(names)
  return dict(zip(names, ids_refs[:c])), dict(zip(names, ids_refs[c:2 * c]))


def _tile_live_and_mask(cfg, q_cols, k_cols, q_slice, k_slice, key_start, block_q, block_kv):
  """(live scalar or None, a function giving the tile's mask or None, a function giving
  its ALiBi distance key_position - query_position)."""
  spec = cfg.spec
  q_ids = {name: ref[q_slice] for name, ref in q_cols.items()}
  k_ids = {name: ref[k_slice] for name, ref in k_cols.items()}
  live = masking.tile_live(
      spec,
      lambda name: (jnp.min(q_ids[name]), jnp.max(q_ids[name])),
      lambda name: (jnp.min(k_ids[name]), jnp.max(k_ids[name])),
      key_start)

  def mask():
    return masking.tile_allowed(
        spec, lambda name: q_ids[name][:, None], lambda name: k_ids[name][None, :],
        key_start, block_q, block_kv)

  def distance():
    return masking.tile_distance(lambda name: q_ids[name][:, None],
                                 lambda name: k_ids[name][None, :], block_q, block_kv)

  return live, mask, distance


def _logits(cfg: _Config, q, k, slope, distance):
  """Float32 scaled logits of one tile, plus ``slope * distance()`` with ALiBi."""
  logits = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
  if cfg.spec.alibi:
    logits = logits + slope * distance()
  return logits


def _maybe(live, compute, carry):
  """compute(carry) where the tile is live, else carry unchanged."""
  if live is None:
    return compute(carry)
  return jax.lax.cond(live, compute, lambda c: c, carry)


def _window_loop(cfg: _Config, window_ref, num_tiles: int, body, init):
  """fori_loop of ``body`` over the tiles of the window [first, last] in ``window_ref``.

  On GPU the loop bounds are the window's. In interpret mode the loop runs over all
  ``num_tiles`` and skips those outside the window (the same tiles): XLA:CPU copies the
  buffers of a loop with a data-dependent trip count, which would blur the memory that
  ``mmjax bench attention`` measures.
  """
  first, last = window_ref[0], window_ref[1]
  if not cfg.interpret:
    return jax.lax.fori_loop(first, last + 1, body, init)

  def guarded(j, carry):
    inside = jnp.logical_and(j >= first, j <= last)
    return jax.lax.cond(inside, lambda c: body(j, c), lambda c: c, carry)

  return jax.lax.fori_loop(0, num_tiles, guarded, init)


def _forward_kernel(window_ref, slope_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config):
  c = len(cfg.spec.columns)
  q_cols, k_cols = _columns(refs[:2 * c], cfg)
  o_ref, lse_ref = refs[2 * c:]
  block_q, block_kv = cfg.block_q, cfg.block_kv
  q = q_ref[...]
  d = q.shape[-1]
  slope = slope_ref[0]

  def body(j, carry):
    key_start = j * block_kv
    k_slice = pl.ds(key_start, block_kv)
    live, mask, distance = _tile_live_and_mask(cfg, q_cols, k_cols, slice(None), k_slice,
                                               key_start, block_q, block_kv)

    def compute(carry):
      acc, m_prev, l_prev = carry
      logits = _logits(cfg, q, k_ref[k_slice, :], slope, distance)
      allowed = mask()
      if allowed is not None:
        logits = jnp.where(allowed, logits, -jnp.inf)
      m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
      # Rows without an allowed key so far keep max -inf: exponentiate against 0.
      m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
      weights = jnp.exp(logits - m_safe[:, None])
      correction = jnp.exp(m_prev - m_safe)
      v = v_ref[k_slice, :]
      acc = correction[:, None] * acc + jax.lax.dot_general(
          weights.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
      return acc, m_next, correction * l_prev + jnp.sum(weights, axis=1)

    return _maybe(live, compute, carry)

  init = (jnp.zeros((block_q, d), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  # Only the window of key tiles that may be live (causal: up to the diagonal).
  acc, m, total = _window_loop(cfg, window_ref, k_ref.shape[0] // block_kv, body, init)
  seen = total > 0.0
  safe_total = jnp.where(seen, total, 1.0)
  o_ref[...] = (acc / safe_total[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe_total), 0.0)


def _id_inputs(cfg, query_ids, key_ids):
  """The id columns as separate [B, T] / [B, S] arrays (Triton blocks are powers of 2)."""
  if not cfg.spec.columns:
    return [], []
  c = len(cfg.spec.columns)
  return ([query_ids[:, :, n] for n in range(c)], [key_ids[:, n, :] for n in range(c)])


def _slopes(slopes, heads: int):
  """Float32[H]: the ALiBi slopes, or zeros (never read) when the call has none."""
  return jnp.zeros((heads,), jnp.float32) if slopes is None else slopes.astype(jnp.float32)


def _forward(cfg: _Config, q, k, v, query_ids, key_ids, slopes):
  """(out [B, T, H, K], lse Float32[B, H, T]) for q [B, T, H, K], k, v [B, S, G, K]."""
  b, t, h, d = q.shape
  s, g = k.shape[1], k.shape[2]
  rep = h // g
  q_id_cols, k_id_cols = _id_inputs(cfg, query_ids, key_ids)
  windows = masking.windows_for(cfg.spec, query_ids, key_ids, cfg.block_q, cfg.block_kv,
                                True, b, t // cfg.block_q, s // cfg.block_kv).reshape(b, -1)
  in_specs = [
      pl.BlockSpec((None, 2), lambda b_, h_, i: (b_, i)),
      pl.BlockSpec((1,), lambda b_, h_, i: (h_,)),
      pl.BlockSpec((None, cfg.block_q, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
      pl.BlockSpec((None, s, None, d), lambda b_, h_, i: (b_, 0, h_ // rep, 0)),
      pl.BlockSpec((None, s, None, d), lambda b_, h_, i: (b_, 0, h_ // rep, 0)),
  ]
  in_specs += [pl.BlockSpec((None, cfg.block_q), lambda b_, h_, i: (b_, i))] * len(q_id_cols)
  in_specs += [pl.BlockSpec((None, s), lambda b_, h_, i: (b_, 0))] * len(k_id_cols)
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(b, h, t // cfg.block_q),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, cfg.block_q, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
          pl.BlockSpec((None, None, cfg.block_q), lambda b_, h_, i: (b_, h_, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=None if cfg.interpret else _compiler_params(4 if d <= 64 else 8, 2),
      interpret=cfg.interpret,
      name="mmjax_flash_forward",
  )(windows, _slopes(slopes, h), q, k, v, *q_id_cols, *k_id_cols)


def _probabilities(cfg, q, k, lse, mask, slope, distance):
  logits = _logits(cfg, q, k, slope, distance)
  probs = jnp.exp(logits - lse[:, None])
  allowed = mask()
  if allowed is not None:
    probs = jnp.where(allowed, probs, 0.0)
  return probs


def _dkv_kernel(window_ref, slope_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                cfg: _Config):
  c = len(cfg.spec.columns)
  q_cols, k_cols = _columns(refs[:2 * c], cfg)
  dk_ref, dv_ref = refs[2 * c:]
  block_q, block_kv = cfg.block_q_bwd, cfg.block_kv_bwd
  key_start = pl.program_id(2) * block_kv
  k, v = k_ref[...], v_ref[...]
  d = k.shape[-1]
  slope = slope_ref[0]

  def body(i, carry):
    q_slice = pl.ds(i * block_q, block_q)
    live, mask, distance = _tile_live_and_mask(cfg, q_cols, k_cols, q_slice, slice(None),
                                               key_start, block_q, block_kv)

    def compute(carry):
      dk, dv = carry
      q, do = q_ref[q_slice, :], do_ref[q_slice, :]
      probs = _probabilities(cfg, q, k, lse_ref[q_slice], mask, slope, distance)
      dv = dv + jax.lax.dot_general(probs.astype(do.dtype), do, _TN,
                                    preferred_element_type=jnp.float32)
      dprobs = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
      dlogits = probs * (dprobs - delta_ref[q_slice][:, None])
      dk = dk + jax.lax.dot_general(dlogits.astype(q.dtype), q, _TN,
                                    preferred_element_type=jnp.float32)
      return dk, dv

    return _maybe(live, compute, carry)

  zeros = jnp.zeros((block_kv, d), jnp.float32)
  dk, dv = _window_loop(cfg, window_ref, q_ref.shape[0] // block_q, body, (zeros, zeros))
  dk_ref[...] = dk * cfg.scale
  dv_ref[...] = dv


def _dq_kernel(window_ref, slope_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               cfg: _Config):
  c = len(cfg.spec.columns)
  q_cols, k_cols = _columns(refs[:2 * c], cfg)
  (dq_ref,) = refs[2 * c:]
  block_q, block_kv = cfg.block_q_bwd, cfg.block_kv_bwd
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  slope = slope_ref[0]

  def body(j, dq):
    key_start = j * block_kv
    k_slice = pl.ds(key_start, block_kv)
    live, mask, distance = _tile_live_and_mask(cfg, q_cols, k_cols, slice(None), k_slice,
                                               key_start, block_q, block_kv)

    def compute(dq):
      k, v = k_ref[k_slice, :], v_ref[k_slice, :]
      probs = _probabilities(cfg, q, k, lse, mask, slope, distance)
      dprobs = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
      dlogits = probs * (dprobs - delta[:, None])
      return dq + jax.lax.dot_general(dlogits.astype(k.dtype), k, _NN,
                                      preferred_element_type=jnp.float32)

    return _maybe(live, compute, dq)

  dq = _window_loop(cfg, window_ref, k_ref.shape[0] // block_kv, body,
                    jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _backward(cfg: _Config, q, k, v, query_ids, key_ids, slopes, out, lse, dout):
  b, t, h, d = q.shape
  s, g = k.shape[1], k.shape[2]
  rep = h // g
  block_q, block_kv = cfg.block_q_bwd, cfg.block_kv_bwd
  # delta[b, h, t] = sum_k dO * O: the row term of the softmax gradient, O(T) in XLA.
  delta = jnp.einsum("BTHK,BTHK->BHT", dout.astype(jnp.float32), out.astype(jnp.float32))
  q_id_cols, k_id_cols = _id_inputs(cfg, query_ids, key_ids)
  params = None if cfg.interpret else _compiler_params(4 if d <= 64 else 8, 1)
  slopes = _slopes(slopes, h)

  # dK, dV per query head: program (b, h, key tile j) loops over all query tiles.
  full_q = pl.BlockSpec((None, t, None, d), lambda b_, h_, j: (b_, 0, h_, 0))
  full_row = pl.BlockSpec((None, None, t), lambda b_, h_, j: (b_, h_, 0))
  kv_tile = pl.BlockSpec((None, block_kv, None, d), lambda b_, h_, j: (b_, j, h_ // rep, 0))
  nq, nk = t // block_q, s // block_kv
  dkv_windows = masking.windows_for(cfg.spec, query_ids, key_ids, block_q, block_kv, False,
                                    b, nk, nq).reshape(b, -1)
  in_specs = [pl.BlockSpec((None, 2), lambda b_, h_, j: (b_, j)),
              pl.BlockSpec((1,), lambda b_, h_, j: (h_,)),
              full_q, kv_tile, kv_tile, full_q, full_row, full_row]
  in_specs += [pl.BlockSpec((None, t), lambda b_, h_, j: (b_, 0))] * len(q_id_cols)
  in_specs += [pl.BlockSpec((None, block_kv), lambda b_, h_, j: (b_, j))] * len(k_id_cols)
  per_head = pl.BlockSpec((None, block_kv, None, d), lambda b_, h_, j: (b_, j, h_, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(b, h, s // block_kv),
      in_specs=in_specs,
      out_specs=[per_head, per_head],
      out_shape=[jax.ShapeDtypeStruct((b, s, h, d), jnp.float32)] * 2,
      compiler_params=params,
      interpret=cfg.interpret,
      name="mmjax_flash_dkv",
  )(dkv_windows, slopes, q, k, v, dout, lse, delta, *q_id_cols, *k_id_cols)
  dk = dk.reshape(b, s, g, rep, d).sum(axis=3).astype(k.dtype)
  dv = dv.reshape(b, s, g, rep, d).sum(axis=3).astype(v.dtype)

  # dQ: program (b, h, query tile i) loops over all key tiles.
  q_tile = pl.BlockSpec((None, block_q, None, d), lambda b_, h_, i: (b_, i, h_, 0))
  row_tile = pl.BlockSpec((None, None, block_q), lambda b_, h_, i: (b_, h_, i))
  full_kv = pl.BlockSpec((None, s, None, d), lambda b_, h_, i: (b_, 0, h_ // rep, 0))
  dq_windows = masking.windows_for(cfg.spec, query_ids, key_ids, block_q, block_kv, True,
                                   b, nq, nk).reshape(b, -1)
  in_specs = [pl.BlockSpec((None, 2), lambda b_, h_, i: (b_, i)),
              pl.BlockSpec((1,), lambda b_, h_, i: (h_,)),
              q_tile, full_kv, full_kv, q_tile, row_tile, row_tile]
  in_specs += [pl.BlockSpec((None, block_q), lambda b_, h_, i: (b_, i))] * len(q_id_cols)
  in_specs += [pl.BlockSpec((None, s), lambda b_, h_, i: (b_, 0))] * len(k_id_cols)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(b, h, t // block_q),
      in_specs=in_specs,
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=cfg.interpret,
      name="mmjax_flash_dq",
  )(dq_windows, slopes, q, k, v, dout, lse, delta, *q_id_cols, *k_id_cols)
  return dq, dk, dv


_flash = flash_vjp.make_flash(_forward, _backward)


def _tile_size(block: int, length: int) -> int:
  """``block``, or for a short sequence the next power of two >= 16 that covers it."""
  return min(block, max(_MIN_TILE, pl.next_power_of_2(length)))


def flash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_ids: jax.Array | None,
    key_ids: jax.Array | None,
    *,
    spec: masking.MaskSpec,
    scale: float,
    alibi_slopes: jax.Array | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Float[B, T, H, K]: flash attention of query [B, T, H, K] over key, value [B, S, G, K].

  ``query_ids`` [B, T, C] and ``key_ids`` [B, C, S] are the stacked ids of
  :func:`masking.stack_ids`. Lengths that are not a multiple of the tiles are padded
  here (padded keys are masked, padded query rows dropped); the head dim is not padded,
  so on GPU it must be a power of two (16 or more). ``alibi_slopes`` Float[H] (with
  ``spec.alibi``) are constants: no gradient flows to them.
  """
  block_sizes = block_sizes or BlockSizes.for_gpu()
  block_sizes.check_gpu()
  b, t, h, d = query.shape
  s = key.shape[1]
  if not interpret and (d < _MIN_TILE or d & (d - 1)):
    raise ValueError(f"head_dim={d} must be a power of two >= {_MIN_TILE} on GPU")
  bq = _tile_size(block_sizes.block_q, t)
  bk = _tile_size(block_sizes.block_kv, s)
  bq_bwd = _tile_size(block_sizes.block_q_bwd, t)
  bk_bwd = _tile_size(block_sizes.block_kv_bwd, s)
  t_pad = masking.round_up(t, max(bq, bq_bwd))  # powers of two: the max is the lcm
  s_pad = masking.round_up(s, max(bk, bk_bwd))
  if s_pad != s:
    spec = dataclasses.replace(spec, key_length=s)
  cfg = _Config(spec, float(scale), bq, bk, bq_bwd, bk_bwd, bool(interpret))
  out = _flash(cfg,
               masking.pad_axis(query, 1, t_pad),
               masking.pad_axis(key, 1, s_pad),
               masking.pad_axis(value, 1, s_pad),
               masking.pad_axis(query_ids, 1, t_pad),
               masking.pad_axis(key_ids, 2, s_pad),
               masking.checked_slopes(spec, alibi_slopes, h))
  return out[:, :t]
