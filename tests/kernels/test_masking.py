"""Tile arithmetic of the kernels' masks: it rebuilds the reference mask, and tile
skipping never drops a tile that holds an allowed pair."""

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.kernels.attention import BlockSizes, attention, masking, reference
from tests.kernels.cases import Case, make_inputs

CASES = [
    Case("causal_segments", batch=3, query_length=32, key_length=32, causal=True,
         segments=True),
    Case("flamingo_immediate", batch=3, query_length=32, images=4, latents=8),
    Case("flamingo_all_previous", batch=3, query_length=32, images=4, latents=8,
         only_attend_immediate_media=False),
    Case("decode", batch=3, query_length=1, key_length=32, causal=True, decode=True),
    Case("causal_window_segments", batch=3, query_length=32, key_length=32, causal=True,
         segments=True, sliding_window=11),
    Case("decode_window", batch=3, query_length=1, key_length=32, causal=True, decode=True,
         sliding_window=5),
]


def _spec_and_ids(case):
  (q, k, _), kwargs = make_inputs(case)
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  spec = masking.MaskSpec(causal=case.causal, segments=case.segments,
                          images=bool(case.images),
                          only_attend_immediate_media=case.only_attend_immediate_media,
                          sliding_window=case.sliding_window, alibi=case.alibi)
  ids_kwargs = {k_: v for k_, v in kwargs.items()
                if k_ not in ("causal", "only_attend_immediate_media", "sliding_window",
                              "alibi_slopes")}
  kwargs.pop("alibi_slopes", None)
  query_ids, key_ids = masking.stack_ids(spec, b, t, s, **ids_kwargs)
  dense = reference.allowed_mask(b, t, s, **kwargs)
  return spec, query_ids, key_ids, np.asarray(dense)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tile_mask_from_ids_equals_the_reference_mask(case):
  spec, query_ids, key_ids, dense = _spec_and_ids(case)
  for row in range(dense.shape[0]):
    tile = masking.tile_allowed(
        spec, lambda name: query_ids[row, :, spec.column(name)][:, None],
        lambda name: key_ids[row, spec.column(name), :][None, :], 0, *dense.shape[1:])
    np.testing.assert_array_equal(np.asarray(tile), dense[row])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tile_skipping_keeps_every_tile_with_an_allowed_pair(case):
  spec, query_ids, key_ids, dense = _spec_and_ids(case)
  block_q = 1 if case.query_length == 1 else 8
  block_kv = 8
  q_ranges = np.asarray(masking.tile_ranges(query_ids, block_q, 1))
  k_ranges = np.asarray(masking.tile_ranges(key_ids, block_kv, 2))
  skipped = 0
  for b in range(dense.shape[0]):
    for i in range(q_ranges.shape[1]):
      for j in range(k_ranges.shape[1]):
        live = masking.tile_live(
            spec, lambda name: tuple(q_ranges[b, i, spec.column(name)]),
            lambda name: tuple(k_ranges[b, j, spec.column(name)]), j * block_kv)
        has_allowed = dense[b, i * block_q:(i + 1) * block_q,
                            j * block_kv:(j + 1) * block_kv].any()
        assert bool(live) or not has_allowed, (b, i, j)
        skipped += not bool(live)
  # The masks are sparse enough that a useful share of tiles is skipped.
  assert skipped > 0


def test_causal_tiles_above_the_diagonal_are_skipped():
  spec = masking.MaskSpec(causal=True)
  positions = jnp.arange(32, dtype=jnp.int32)[None, :]
  q_ranges = np.asarray(masking.tile_ranges(positions[:, :, None], 8, 1))
  k_ranges = np.asarray(masking.tile_ranges(positions[:, None, :], 8, 2))
  live = np.array([[bool(masking.tile_live(spec, lambda n: tuple(q_ranges[0, i, 0]),
                                           lambda n: tuple(k_ranges[0, j, 0]), j * 8))
                    for j in range(4)] for i in range(4)])
  np.testing.assert_array_equal(live, np.tril(np.ones((4, 4), bool)))


def test_sliding_window_tiles_outside_the_band_are_skipped_and_not_fetched():
  # Positions 0..63 in tiles of 8, window 16: query tile i meets key tiles i-2..i (the
  # pair closest in tile i-2 is 8i - (8i - 9) = 9 apart, in tile i-3 it is 17).
  spec = masking.MaskSpec(causal=True, sliding_window=16)
  positions = jnp.arange(64, dtype=jnp.int32)[None, :]
  q_ranges = masking.tile_ranges(positions[:, :, None], 8, 1)
  k_ranges = masking.tile_ranges(positions[:, None, :], 8, 2)
  qr, kr = np.asarray(q_ranges), np.asarray(k_ranges)
  live = np.array([[bool(masking.tile_live(spec, lambda n: tuple(qr[0, i, 0]),
                                           lambda n: tuple(kr[0, j, 0]), j * 8))
                    for j in range(8)] for i in range(8)])
  band = np.tril(np.ones((8, 8), bool)) & ~np.tril(np.ones((8, 8), bool), -3)
  np.testing.assert_array_equal(live, band)
  # The TPU index maps clamp key tiles into each query tile's window, so the tiles before
  # the band are never fetched (nor, in dK/dV, the query tiles past it).
  windows = np.asarray(masking.live_windows(spec, q_ranges, k_ranges, 8, over_keys=True))
  np.testing.assert_array_equal(windows[0], [[max(i - 2, 0), i] for i in range(8)])
  windows = np.asarray(masking.live_windows(spec, q_ranges, k_ranges, 8, over_keys=False))
  np.testing.assert_array_equal(windows[0], [[j, min(j + 2, 7)] for j in range(8)])


def test_alibi_alone_adds_the_position_column_and_masks_nothing():
  spec = masking.MaskSpec(alibi=True)
  assert spec.columns == ("position",)
  query_ids, key_ids = masking.stack_ids(spec, 1, 3, 5)
  distance = masking.tile_distance(lambda n: query_ids[0, :, 0][:, None],
                                   lambda n: key_ids[0, 0, :][None, :], 3, 5)
  np.testing.assert_array_equal(np.asarray(distance),
                                np.arange(5)[None, :] - np.arange(3)[:, None])
  assert masking.tile_allowed(spec, None, None, 0, 3, 5) is None


def test_block_sizes_reject_non_positive_and_non_integer_sizes():
  with pytest.raises(ValueError, match="block_q=0"):
    BlockSizes(block_q=0)
  with pytest.raises(ValueError, match="block_kv=12.5"):
    BlockSizes(block_kv=12.5)


def test_block_sizes_name_the_tile_mosaic_cannot_lower():
  with pytest.raises(ValueError, match="block_kv=96 .* multiple of 128"):
    BlockSizes(block_kv=96).check_tpu(1024, 1024)
  with pytest.raises(ValueError, match="block_q=12 .* multiple of 8"):
    BlockSizes(block_q=12).check_tpu(1024, 1024)
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=48).check_gpu()
  BlockSizes.for_tpu("v5e").check_tpu(4096, 4096)
  BlockSizes.for_tpu("v6e").check_tpu(4096, 4096)
  BlockSizes.for_gpu().check_gpu()


def test_attention_rejects_an_unknown_backend_by_name():
  case = Case("plain")
  (q, k, v), _ = make_inputs(case)
  with pytest.raises(ValueError, match="backend='flash'"):
    attention(q, k, v, backend="flash")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_live_windows_cover_every_live_tile_and_exclude_dead_edges(case):
  spec, query_ids, key_ids, _ = _spec_and_ids(case)
  block_q = 1 if case.query_length == 1 else 8
  q_ranges = masking.tile_ranges(query_ids, block_q, 1)
  k_ranges = masking.tile_ranges(key_ids, 8, 2)
  qr, kr = np.asarray(q_ranges), np.asarray(k_ranges)
  live = np.array([[[bool(masking.tile_live(
      spec, lambda name: tuple(qr[b, i, spec.column(name)]),
      lambda name: tuple(kr[b, j, spec.column(name)]), j * 8))
      for j in range(kr.shape[1])] for i in range(qr.shape[1])] for b in range(qr.shape[0])])
  for over_keys, table in ((True, live), (False, np.swapaxes(live, 1, 2))):
    windows = np.asarray(masking.live_windows(spec, q_ranges, k_ranges, 8, over_keys))
    for b in range(table.shape[0]):
      for outer in range(table.shape[1]):
        first, last = windows[b, outer]
        live_inner = np.flatnonzero(table[b, outer])
        if live_inner.size:
          assert (first, last) == (live_inner.min(), live_inner.max())
        else:
          assert (first, last) == (0, 0)
