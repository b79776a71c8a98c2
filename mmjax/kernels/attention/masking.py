"""The mask of ``reference.py`` as tile arithmetic, shared by the TPU and GPU kernels.

Dimension letters: B batch, T query length, S key length, C id columns, n tiles.

The kernels never see a dense [T, S] mask. Each query carries up to three integer ids
(its position, its segment, the index of its last image) and each key the matching three
(position, segment, image id). Positions also serve the sliding window (a band of the
causal mask) and ALiBi (a bias ``slope * (key_position - query_position)`` rebuilt per
tile by :func:`tile_distance`), so no dense [T, S] mask or bias exists anywhere. The wrapper stacks the ids that the call uses into
``query_ids`` [B, T, C] and ``key_ids`` [B, C, S] (columns in the order of
:attr:`MaskSpec.columns`), and a kernel rebuilds the [block_q, block_kv] mask of one tile
from the two id tiles.

A tile is skipped when no query of it may attend to any key of it. That is decided
before the tile is read, from the minimum and maximum of every id over each tile
(:func:`tile_ranges`): a conservative test (a live tile may still be all masked, never
the other way round), so skipping never changes the result.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Which parts of the mask language a call uses; static, so the kernel specialises."""

  causal: bool = False
  segments: bool = False
  images: bool = False
  only_attend_immediate_media: bool = True
  # The unpadded key length; keys at or past it are padding and always masked. None when
  # the key length needed no padding.
  key_length: int | None = None
  # With causal: a query sees only keys fewer than this many positions back. None: no window.
  sliding_window: int | None = None
  # ALiBi: the kernels add slope[h] * (key_position - query_position) to the logits; the
  # slopes are a kernel input, only the need for positions is static.
  alibi: bool = False

  def __post_init__(self):
    if self.sliding_window is not None and (not self.causal or self.sliding_window < 1):
      raise ValueError(f"MaskSpec.sliding_window={self.sliding_window} needs causal=True and "
                       "a positive window")

  @property
  def positions(self) -> bool:
    """Whether the kernels read positions (the causal mask, its window, or ALiBi)."""
    return self.causal or self.alibi

  @property
  def columns(self) -> tuple[str, ...]:
    """The id columns the kernels read, in order."""
    return tuple(name for name, used in (("position", self.positions),
                                         ("segment", self.segments),
                                         ("image", self.images)) if used)

  def column(self, name: str) -> int:
    return self.columns.index(name)


def stack_ids(
    spec: MaskSpec,
    batch: int,
    query_length: int,
    key_length: int,
    *,
    query_positions=None,
    key_positions=None,
    query_segment_ids=None,
    key_segment_ids=None,
    query_image_index=None,
    key_image_ids=None,
) -> tuple[jax.Array | None, jax.Array | None]:
  """(Int32[B, T, C], Int32[B, C, S]) of the ids ``spec`` uses, or (None, None) if none."""
  if not spec.columns:
    return None, None
  query_columns, key_columns = [], []
  if spec.positions:
    # Without explicit positions, causal masks and ALiBi distances are over the index.
    if query_positions is None:
      query_positions = jnp.broadcast_to(jnp.arange(query_length, dtype=jnp.int32),
                                         (batch, query_length))
    if key_positions is None:
      key_positions = jnp.broadcast_to(jnp.arange(key_length, dtype=jnp.int32),
                                       (batch, key_length))
    query_columns.append(query_positions)
    key_columns.append(key_positions)
  if spec.segments:
    query_columns.append(query_segment_ids)
    key_columns.append(key_segment_ids)
  if spec.images:
    query_columns.append(query_image_index)
    key_columns.append(key_image_ids)
  query_ids = jnp.stack([c.astype(jnp.int32) for c in query_columns], axis=2)
  key_ids = jnp.stack([c.astype(jnp.int32) for c in key_columns], axis=1)
  return query_ids, key_ids


def tile_allowed(spec: MaskSpec, query_column: Callable, key_column: Callable, key_start,
                 block_q: int, block_kv: int) -> jax.Array | None:
  """Bool[block_q, block_kv] mask of one tile, or None if every pair is allowed.

  ``query_column(name)`` returns the [block_q, 1] ids of the tile's queries and
  ``key_column(name)`` the [1, block_kv] ids of its keys, for a column of
  :attr:`MaskSpec.columns`; ``key_start`` is the index of the tile's first key.
  """
  allowed = None

  def conj(a, b):
    return b if a is None else jnp.logical_and(a, b)

  q_col, k_col = query_column, key_column
  shape = (block_q, block_kv)
  if spec.causal:
    q_pos = jnp.broadcast_to(q_col("position"), shape)
    k_pos = jnp.broadcast_to(k_col("position"), shape)
    allowed = conj(allowed, k_pos <= q_pos)
    if spec.sliding_window is not None:
      allowed = conj(allowed, q_pos - k_pos < spec.sliding_window)
  if spec.segments:
    allowed = conj(allowed, jnp.broadcast_to(q_col("segment"), shape)
                   == jnp.broadcast_to(k_col("segment"), shape))
  if spec.images:
    q_img = jnp.broadcast_to(q_col("image"), shape)
    k_img = jnp.broadcast_to(k_col("image"), shape)
    seen = (k_img == q_img) if spec.only_attend_immediate_media else (k_img <= q_img)
    allowed = conj(allowed, jnp.logical_and(seen, q_img > 0))
  if spec.key_length is not None:
    key_index = key_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    allowed = conj(allowed, key_index < spec.key_length)
  return allowed


def tile_distance(query_column: Callable, key_column: Callable, block_q: int,
                  block_kv: int) -> jax.Array:
  """Float32[block_q, block_kv]: ``key_position - query_position`` of one tile, the ALiBi
  distance (the kernel multiplies it by its head's slope). Arguments as for
  :func:`tile_allowed`; the difference is taken in int32, then converted, as the
  reference does."""
  shape = (block_q, block_kv)
  distance = (jnp.broadcast_to(key_column("position"), shape)
              - jnp.broadcast_to(query_column("position"), shape))
  return distance.astype(jnp.float32)


def tile_ranges(ids: jax.Array, block: int, axis: int) -> jax.Array:
  """Int32[B, n, C, 2]: (min, max) of each id column over each tile of ``block`` along
  ``axis`` (1 for query ids [B, T, C], 2 for key ids [B, C, S])."""
  if axis == 2:
    ids = jnp.swapaxes(ids, 1, 2)
  b, length, c = ids.shape
  tiles = ids.reshape(b, length // block, block, c)
  return jnp.stack([tiles.min(axis=2), tiles.max(axis=2)], axis=-1)


def tile_live(spec: MaskSpec, query_range: Callable, key_range: Callable, key_start):
  """Bool scalar: may any query of a tile attend to any key of it?

  ``query_range(name)`` and ``key_range(name)`` return the (min, max) scalars of an id
  column over the query and the key tile; ``key_start`` is the tile's first key index.
  """
  live = None

  def conj(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if spec.causal:
    q_min, q_max = query_range("position")
    k_min, k_max = key_range("position")
    live = conj(live, k_min <= q_max)
    if spec.sliding_window is not None:
      # The closest pair is the first query and the last key: if even it is a window or
      # more apart, every pair is.
      live = jnp.logical_and(live, q_min - k_max < spec.sliding_window)
  if spec.segments:
    q_min, q_max = query_range("segment")
    k_min, k_max = key_range("segment")
    live = conj(live, jnp.logical_and(q_min <= k_max, k_min <= q_max))
  if spec.images:
    q_min, q_max = query_range("image")
    k_min, k_max = key_range("image")
    live = conj(live, jnp.logical_and(q_max > 0, k_min <= q_max))
    if spec.only_attend_immediate_media:
      live = jnp.logical_and(live, jnp.maximum(q_min, 1) <= k_max)
  if spec.key_length is not None:
    live = conj(live, key_start < spec.key_length)
  return live


def checked_slopes(spec: MaskSpec, alibi_slopes: jax.Array | None, heads: int):
  """Float32[H] ALiBi slopes as the kernels take them (None without ``spec.alibi``).

  The slopes are constants of the model, so their gradient is stopped here: the kernels'
  custom_vjp gives them no cotangent.
  """
  if (alibi_slopes is not None) != spec.alibi:
    raise ValueError(f"alibi_slopes is {'given' if alibi_slopes is not None else 'None'} but "
                     f"MaskSpec.alibi={spec.alibi}; expected both or neither")
  if alibi_slopes is None:
    return None
  if tuple(alibi_slopes.shape) != (heads,):
    raise ValueError(f"alibi_slopes has shape {tuple(alibi_slopes.shape)}; expected ({heads},)")
  return jax.lax.stop_gradient(alibi_slopes.astype(jnp.float32))


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def pad_axis(x: jax.Array | None, axis: int, length: int) -> jax.Array | None:
  """``x`` padded at the end of ``axis`` to ``length``: zeros for floats, the last id
  repeated for integer ids (keeps tile ranges tight; padded keys are masked by index)."""
  if x is None or x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  mode = "edge" if jnp.issubdtype(x.dtype, jnp.integer) else "constant"
  return jnp.pad(x, widths, mode=mode)


def live_windows(spec: MaskSpec, query_ranges, key_ranges, block_kv: int,
                 over_keys: bool = True) -> jax.Array:
  """Int32[B, n_outer, 2]: per outer tile, the first and last inner tile that is live.

  With ``over_keys`` the outer tiles are query tiles and the inner ones key tiles (the
  forward and dQ kernels), else the reverse (the dK/dV kernel). ``query_ranges`` and
  ``key_ranges`` are :func:`tile_ranges` ([B, n, C, 2]; None when there are no ids).
  Tiles outside the window are dead, so a kernel may clamp its block index into it: a
  repeated block index is not fetched again, which saves the DMA of dead tiles (causal:
  those past the diagonal; a sliding window: also those before the band). A window
  with no live tile is (0, 0).
  """
  nq = query_ranges.shape[1]
  nk = key_ranges.shape[1]
  key_start = (jnp.arange(nk, dtype=jnp.int32) * block_kv)[None, None, :]
  live = tile_live(
      spec,
      lambda name: (query_ranges[:, :, spec.column(name), 0][:, :, None],
                    query_ranges[:, :, spec.column(name), 1][:, :, None]),
      lambda name: (key_ranges[:, :, spec.column(name), 0][:, None, :],
                    key_ranges[:, :, spec.column(name), 1][:, None, :]),
      key_start)
  b = query_ranges.shape[0]
  live = jnp.broadcast_to(live, (b, nq, nk))
  if not over_keys:
    live = jnp.swapaxes(live, 1, 2)
  n_inner = live.shape[2]
  any_live = live.any(axis=2)
  first = jnp.argmax(live, axis=2).astype(jnp.int32)
  last = (n_inner - 1 - jnp.argmax(live[:, :, ::-1], axis=2)).astype(jnp.int32)
  first = jnp.where(any_live, first, 0)
  last = jnp.where(any_live, last, 0)
  return jnp.stack([first, last], axis=-1)


def windows_for(spec: MaskSpec, query_ids, key_ids, block_q: int, block_kv: int,
                over_keys: bool, batch: int, n_outer: int, n_inner: int) -> jax.Array:
  """Int32[B, n_outer, 2]: :func:`live_windows` from the stacked ids (or, with no ids,
  every inner tile up to the last unpadded key)."""
  if query_ids is None:
    last = n_inner - 1
    if over_keys and spec.key_length is not None:
      last = (spec.key_length - 1) // block_kv
    return jnp.broadcast_to(jnp.asarray([0, last], jnp.int32), (batch, n_outer, 2))
  return live_windows(spec, tile_ranges(query_ids, block_q, 1),
                      tile_ranges(key_ids, block_kv, 2), block_kv, over_keys=over_keys)
