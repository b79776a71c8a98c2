"""Pallas TPU (Mosaic) flash attention: forward, dK/dV and dQ kernels, and their custom_vjp.

Dimension letters: B batch, T query length, S key length, H query heads, G key/value
heads (R = H // G queries share a key/value head), K head dim, C id columns.

The mask is rebuilt per tile from integer ids (``masking.py``); a tile that no query of
it may attend to is skipped, decided from per-tile id ranges held in SMEM (scalar
prefetch). Softmax statistics (running max, sum, log-sum-exp) are float32; a query row
with no allowed key outputs zeros and gets zero gradients. ALiBi is computed inside the
tile from the position ids and the head's slope, which sits in SMEM with the ranges (the
slopes are constants: no gradient flows to them).

Inside the kernels the arrays are head-major ([B, H, T, K]) so that a tile is a
(rows, head_dim) matrix in VMEM, the layout the MXU wants.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mmjax.kernels.attention import flash_vjp
from mmjax.kernels.attention import masking
from mmjax.kernels.attention.block_sizes import TPU_LANES, TPU_SUBLANES, BlockSizes

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class _Config:
  spec: masking.MaskSpec
  scale: float
  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int
  interpret: bool


def _interpret_params(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _ranges_1d(ids, block, axis):
  """Int32[B * n * C * 2]: per-tile (min, max) of every id, flat for SMEM."""
  if ids is None:
    return jnp.zeros((1,), jnp.int32)
  return masking.tile_ranges(ids, block, axis).reshape(-1)


def _windows_1d(cfg: _Config, query_ids, key_ids, block_q, block_kv, over_keys, b, n_outer,
                n_inner):
  """Int32[B * n_outer * 2]: each outer tile's window of live inner tiles, flat for SMEM."""
  return masking.windows_for(cfg.spec, query_ids, key_ids, block_q, block_kv, over_keys, b,
                             n_outer, n_inner).reshape(-1)


def _clamp(windows_ref, b, outer, n_outer, inner):
  """``inner`` clamped into the live window of tile ``outer`` of batch ``b``: outside the
  window every step maps to the same block, which the pipeline does not fetch again."""
  at = (b * n_outer + outer) * 2
  return jnp.minimum(jnp.maximum(inner, windows_ref[at]), windows_ref[at + 1])


def _live(cfg: _Config, q_ranges_ref, k_ranges_ref, b, i, j, num_q_tiles, num_k_tiles,
          block_kv):
  """Scalar bool: may tile (query tile i, key tile j) of batch b hold an allowed pair?"""
  spec = cfg.spec
  c = len(spec.columns)

  def query_range(name):
    at = ((b * num_q_tiles + i) * c + spec.column(name)) * 2
    return q_ranges_ref[at], q_ranges_ref[at + 1]

  def key_range(name):
    at = ((b * num_k_tiles + j) * c + spec.column(name)) * 2
    return k_ranges_ref[at], k_ranges_ref[at + 1]

  live = masking.tile_live(spec, query_range, key_range, j * block_kv)
  return True if live is None else live


def _id_columns(cfg: _Config, q_ids_ref, k_ids_ref):
  """(query_column, key_column): readers of one id column as [block_q, 1] and
  [1, block_kv] from the [block_q, C] and [C, block_kv] id tiles in VMEM."""
  spec = cfg.spec

  def query_column(name):
    c = spec.column(name)
    return q_ids_ref[:, c:c + 1]

  def key_column(name):
    c = spec.column(name)
    return k_ids_ref[c:c + 1, :]

  return query_column, key_column


def _tile_allowed(cfg: _Config, q_ids_ref, k_ids_ref, key_start, block_q, block_kv):
  """Bool[block_q, block_kv] mask of one tile (None if every pair is allowed)."""
  if q_ids_ref is None and cfg.spec.key_length is None:
    return None
  query_column, key_column = _id_columns(cfg, q_ids_ref, k_ids_ref)
  return masking.tile_allowed(cfg.spec, query_column, key_column, key_start, block_q, block_kv)


def _logits(cfg: _Config, q, k, slopes_ref, head, q_ids_ref, k_ids_ref, block_q, block_kv):
  """Float32[block_q, block_kv]: scaled logits of one tile of query head ``head``, plus its
  ALiBi bias when the call has one."""
  logits = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
  if cfg.spec.alibi:
    query_column, key_column = _id_columns(cfg, q_ids_ref, k_ids_ref)
    logits = logits + slopes_ref[head] * masking.tile_distance(query_column, key_column,
                                                               block_q, block_kv)
  return logits


def _when(condition):
  """pl.when that also accepts a static True."""
  if condition is True:
    return lambda f: f()
  return pl.when(condition)


def _forward_kernel(q_ranges_ref, k_ranges_ref, windows_ref, slopes_ref, q_ref, k_ref, v_ref, *refs,
                    cfg: _Config):
  if cfg.spec.columns:
    q_ids_ref, k_ids_ref, o_ref, lse_ref, m_scratch, l_scratch, acc_scratch = refs
  else:
    q_ids_ref = k_ids_ref = None
    o_ref, lse_ref, m_scratch, l_scratch, acc_scratch = refs
  b, head, i, j = (pl.program_id(axis) for axis in range(4))
  num_q_tiles, num_k_tiles = pl.num_programs(2), pl.num_programs(3)
  block_q, block_kv = cfg.block_q, cfg.block_kv

  @pl.when(j == 0)
  def _init():
    m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  live = _live(cfg, q_ranges_ref, k_ranges_ref, b, i, j, num_q_tiles, num_k_tiles, block_kv)

  @_when(live)
  def _tile():
    logits = _logits(cfg, q_ref[...], k_ref[...], slopes_ref, head, q_ids_ref, k_ids_ref,
                     block_q, block_kv)
    allowed = _tile_allowed(cfg, q_ids_ref, k_ids_ref, j * block_kv, block_q, block_kv)
    if allowed is not None:
      logits = jnp.where(allowed, logits, -jnp.inf)
    m_prev = m_scratch[...]
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
    # A row that has seen no allowed key yet keeps max -inf; exponentiate against 0 so
    # that its weights are exp(-inf) = 0 rather than NaN.
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    weights = jnp.exp(logits - m_safe)
    correction = jnp.exp(m_prev - m_safe)
    l_scratch[...] = correction * l_scratch[...] + jnp.sum(weights, axis=1, keepdims=True)
    v = v_ref[...]
    acc_scratch[...] = correction * acc_scratch[...] + jax.lax.dot_general(
        weights.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
    m_scratch[...] = m_next

  @pl.when(j == num_k_tiles - 1)
  def _finish():
    total = l_scratch[...]
    seen = total > 0.0
    # Rows with no allowed key: acc is 0, divide by 1 to output zeros.
    o_ref[...] = (acc_scratch[...] / jnp.where(seen, total, 1.0)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_scratch[...] + jnp.log(jnp.where(seen, total, 1.0)),
                             0.0)


def _id_specs(cfg: _Config, block_q, block_kv, q_index, k_index):
  """BlockSpecs of the id tiles: [block_q, C] of query ids, [C, block_kv] of key ids."""
  c = len(cfg.spec.columns)
  return [pl.BlockSpec((None, block_q, c), q_index), pl.BlockSpec((None, c, block_kv), k_index)]


def _slopes_1d(slopes):
  """Float32[H] ALiBi slopes for SMEM, or a placeholder when the call has none."""
  if slopes is None:
    return jnp.zeros((1,), jnp.float32)
  return slopes.astype(jnp.float32)


def _forward(cfg: _Config, q, k, v, query_ids, key_ids, slopes):
  """(out [B, H, T, K], lse Float32[B, H, T, 1]) for head-major q [B, H, T, K], k, v
  [B, G, S, K]."""
  b, h, t, d = q.shape
  g, s = k.shape[1], k.shape[2]
  rep = h // g
  grid = (b, h, t // cfg.block_q, s // cfg.block_kv)
  q_ranges = _ranges_1d(query_ids, cfg.block_q, 1)
  k_ranges = _ranges_1d(key_ids, cfg.block_kv, 2)

  nq, nk = grid[2], grid[3]
  windows = _windows_1d(cfg, query_ids, key_ids, cfg.block_q, cfg.block_kv, True, b, nq, nk)
  q_map = lambda b_, h_, i, j, *_: (b_, h_, i, 0)
  kv_map = lambda b_, h_, i, j, qr, kr, w, *_: (b_, h_ // rep, _clamp(w, b_, i, nq, j), 0)
  in_specs = [
      pl.BlockSpec((None, None, cfg.block_q, d), q_map),
      pl.BlockSpec((None, None, cfg.block_kv, d), kv_map),
      pl.BlockSpec((None, None, cfg.block_kv, d), kv_map),
  ]
  args = [q, k, v]
  if cfg.spec.columns:
    in_specs += _id_specs(cfg, cfg.block_q, cfg.block_kv,
                          lambda b_, h_, i, j, *_: (b_, i, 0),
                          lambda b_, h_, i, j, qr, kr, w, *_: (b_, 0, _clamp(w, b_, i, nq, j)))
    args += [query_ids, key_ids]
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=grid,
          in_specs=in_specs,
          out_specs=[
              pl.BlockSpec((None, None, cfg.block_q, d), q_map),
              pl.BlockSpec((None, None, cfg.block_q, 1), q_map),
          ],
          scratch_shapes=[
              pltpu.VMEM((cfg.block_q, 1), jnp.float32),
              pltpu.VMEM((cfg.block_q, 1), jnp.float32),
              pltpu.VMEM((cfg.block_q, d), jnp.float32),
          ],
      ),
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32),
      ],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret_params(cfg.interpret),
      name="mmjax_flash_forward",
  )(q_ranges, k_ranges, windows, _slopes_1d(slopes), *args)
  return out, lse


def _probabilities(cfg, q, k, lse, slopes_ref, head, q_ids_ref, k_ids_ref, key_start, block_q,
                   block_kv):
  """Float32[block_q, block_kv]: the softmax weights of one tile, recomputed."""
  logits = _logits(cfg, q, k, slopes_ref, head, q_ids_ref, k_ids_ref, block_q, block_kv)
  probs = jnp.exp(logits - lse)
  allowed = _tile_allowed(cfg, q_ids_ref, k_ids_ref, key_start, block_q, block_kv)
  if allowed is not None:
    probs = jnp.where(allowed, probs, 0.0)
  return probs


def _dkv_kernel(q_ranges_ref, k_ranges_ref, windows_ref, slopes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, *refs, cfg: _Config):
  if cfg.spec.columns:
    q_ids_ref, k_ids_ref, dk_ref, dv_ref, dk_scratch, dv_scratch = refs
  else:
    q_ids_ref = k_ids_ref = None
    dk_ref, dv_ref, dk_scratch, dv_scratch = refs
  b, kv_head, j, r, i = (pl.program_id(axis) for axis in range(5))
  num_k_tiles, num_rep, num_q_tiles = (pl.num_programs(axis) for axis in (2, 3, 4))
  head = kv_head * num_rep + r
  block_q, block_kv = cfg.block_q_bwd, cfg.block_kv_bwd

  @pl.when(jnp.logical_and(r == 0, i == 0))
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  live = _live(cfg, q_ranges_ref, k_ranges_ref, b, i, j, num_q_tiles, num_k_tiles, block_kv)

  @_when(live)
  def _tile():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    probs = _probabilities(cfg, q, k, lse_ref[...], slopes_ref, head, q_ids_ref, k_ids_ref,
                           j * block_kv, block_q, block_kv)
    dv_scratch[...] += jax.lax.dot_general(probs.astype(do.dtype).T, do, _NN,
                                           preferred_element_type=jnp.float32)
    dprobs = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    dlogits = probs * (dprobs - delta_ref[...])
    dk_scratch[...] += jax.lax.dot_general(dlogits.astype(q.dtype).T, q, _NN,
                                           preferred_element_type=jnp.float32)

  @pl.when(jnp.logical_and(r == num_rep - 1, i == num_q_tiles - 1))
  def _finish():
    dk_ref[...] = (dk_scratch[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _dq_kernel(q_ranges_ref, k_ranges_ref, windows_ref, slopes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, *refs, cfg: _Config):
  if cfg.spec.columns:
    q_ids_ref, k_ids_ref, dq_ref, dq_scratch = refs
  else:
    q_ids_ref = k_ids_ref = None
    dq_ref, dq_scratch = refs
  b, head, i, j = (pl.program_id(axis) for axis in range(4))
  num_q_tiles, num_k_tiles = pl.num_programs(2), pl.num_programs(3)
  block_q, block_kv = cfg.block_q_bwd, cfg.block_kv_bwd

  @pl.when(j == 0)
  def _init():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  live = _live(cfg, q_ranges_ref, k_ranges_ref, b, i, j, num_q_tiles, num_k_tiles, block_kv)

  @_when(live)
  def _tile():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    probs = _probabilities(cfg, q, k, lse_ref[...], slopes_ref, head, q_ids_ref, k_ids_ref,
                           j * block_kv, block_q, block_kv)
    dprobs = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    dlogits = probs * (dprobs - delta_ref[...])
    dq_scratch[...] += jax.lax.dot_general(dlogits.astype(k.dtype), k, _NN,
                                           preferred_element_type=jnp.float32)

  @pl.when(j == num_k_tiles - 1)
  def _finish():
    dq_ref[...] = (dq_scratch[...] * cfg.scale).astype(dq_ref.dtype)


def _backward(cfg: _Config, q, k, v, query_ids, key_ids, slopes, out, lse, dout):
  b, h, t, d = q.shape
  g, s = k.shape[1], k.shape[2]
  rep = h // g
  block_q, block_kv = cfg.block_q_bwd, cfg.block_kv_bwd
  # delta_t = sum_k dO_tk O_tk: the row term of the softmax gradient, O(T) work in XLA.
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  q_ranges = _ranges_1d(query_ids, block_q, 1)
  k_ranges = _ranges_1d(key_ids, block_kv, 2)
  slopes = _slopes_1d(slopes)
  args = [q, k, v, dout, lse, delta]
  if cfg.spec.columns:
    args += [query_ids, key_ids]
  semantics = pltpu.CompilerParams

  # dK, dV: one key tile of one kv head accumulates over its R query heads and all
  # query tiles (the two innermost, sequential grid axes).
  nq, nk = t // block_q, s // block_kv
  windows = _windows_1d(cfg, query_ids, key_ids, block_q, block_kv, False, b, nk, nq)
  q_map = lambda b_, g_, j, r, i, qr, kr, w, *_: (b_, g_ * rep + r, _clamp(w, b_, j, nk, i), 0)
  kv_map = lambda b_, g_, j, r, i, *_: (b_, g_, j, 0)
  in_specs = [
      pl.BlockSpec((None, None, block_q, d), q_map),
      pl.BlockSpec((None, None, block_kv, d), kv_map),
      pl.BlockSpec((None, None, block_kv, d), kv_map),
      pl.BlockSpec((None, None, block_q, d), q_map),
      pl.BlockSpec((None, None, block_q, 1), q_map),
      pl.BlockSpec((None, None, block_q, 1), q_map),
  ]
  if cfg.spec.columns:
    in_specs += _id_specs(cfg, block_q, block_kv,
                          lambda b_, g_, j, r, i, qr, kr, w, *_: (b_, _clamp(w, b_, j, nk, i), 0),
                          lambda b_, g_, j, r, i, *_: (b_, 0, j))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(b, g, nk, rep, nq),
          in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, block_kv, d), kv_map),
                     pl.BlockSpec((None, None, block_kv, d), kv_map)],
          scratch_shapes=[pltpu.VMEM((block_kv, d), jnp.float32),
                          pltpu.VMEM((block_kv, d), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=semantics(dimension_semantics=(
          "parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=_interpret_params(cfg.interpret),
      name="mmjax_flash_dkv",
  )(q_ranges, k_ranges, windows, slopes, *args)

  # dQ: one query tile accumulates over all key tiles.
  windows = _windows_1d(cfg, query_ids, key_ids, block_q, block_kv, True, b, nq, nk)
  q_map = lambda b_, h_, i, j, *_: (b_, h_, i, 0)
  kv_map = lambda b_, h_, i, j, qr, kr, w, *_: (b_, h_ // rep, _clamp(w, b_, i, nq, j), 0)
  in_specs = [
      pl.BlockSpec((None, None, block_q, d), q_map),
      pl.BlockSpec((None, None, block_kv, d), kv_map),
      pl.BlockSpec((None, None, block_kv, d), kv_map),
      pl.BlockSpec((None, None, block_q, d), q_map),
      pl.BlockSpec((None, None, block_q, 1), q_map),
      pl.BlockSpec((None, None, block_q, 1), q_map),
  ]
  if cfg.spec.columns:
    in_specs += _id_specs(cfg, block_q, block_kv,
                          lambda b_, h_, i, j, *_: (b_, i, 0),
                          lambda b_, h_, i, j, qr, kr, w, *_: (b_, 0, _clamp(w, b_, i, nq, j)))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(b, h, nq, nk),
          in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, block_q, d), q_map),
          scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=semantics(dimension_semantics=(
          "parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret_params(cfg.interpret),
      name="mmjax_flash_dq",
  )(q_ranges, k_ranges, windows, slopes, *args)
  return dq, dk, dv


_flash = flash_vjp.make_flash(_forward, _backward)


def _tile_size(block: int, length: int, align: int) -> int:
  """The tile actually used: ``block``, or less for a short sequence (rounded up to
  ``align``, or the whole padded length)."""
  return min(block, masking.round_up(length, align))


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
  here (padded keys are masked, padded query rows dropped). ``alibi_slopes`` Float[H]
  (with ``spec.alibi``) are constants: no gradient flows to them.
  """
  block_sizes = block_sizes or BlockSizes.for_tpu()
  b, t, h, d = query.shape
  s = key.shape[1]
  kv_align = TPU_LANES if s >= TPU_LANES else TPU_SUBLANES
  bq = _tile_size(block_sizes.block_q, t, TPU_SUBLANES)
  bk = _tile_size(block_sizes.block_kv, s, kv_align)
  bq_bwd = _tile_size(block_sizes.block_q_bwd, t, TPU_SUBLANES)
  bk_bwd = _tile_size(block_sizes.block_kv_bwd, s, kv_align)
  if not interpret:
    BlockSizes(bq, bk, bq_bwd, bk_bwd).check_tpu(masking.round_up(t, TPU_SUBLANES),
                                                  masking.round_up(s, kv_align))
  t_pad = masking.round_up(t, _lcm(bq, bq_bwd))
  s_pad = masking.round_up(s, _lcm(bk, bk_bwd))
  if s_pad != s:
    spec = dataclasses.replace(spec, key_length=s)
  cfg = _Config(spec, float(scale), bq, bk, bq_bwd, bk_bwd, bool(interpret))
  q = jnp.swapaxes(masking.pad_axis(query, 1, t_pad), 1, 2)
  k = jnp.swapaxes(masking.pad_axis(key, 1, s_pad), 1, 2)
  v = jnp.swapaxes(masking.pad_axis(value, 1, s_pad), 1, 2)
  query_ids = masking.pad_axis(query_ids, 1, t_pad)
  key_ids = masking.pad_axis(key_ids, 2, s_pad)
  out = _flash(cfg, q, k, v, query_ids, key_ids, masking.checked_slopes(spec, alibi_slopes, h))
  return jnp.swapaxes(out, 1, 2)[:, :t]


def _lcm(a: int, b: int) -> int:
  return a * b // math.gcd(a, b)
