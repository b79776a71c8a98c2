"""The Pallas TPU and GPU kernels equal the XLA reference, forward and dq/dk/dv.

Run in interpret mode on CPU (TPU kernels through ``pltpu.InterpretParams``, GPU kernels
with ``interpret=True``). Interpret mode is slow, so the default tier uses tiny shapes
and small tiles (so that every case still spans several tiles); larger grids are slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.kernels.attention import BlockSizes, api, attention, force_interpret, reference
from tests.kernels.cases import Case, check_backend_matches_reference, make_inputs, rel_err

BACKENDS = ("pallas_tpu", "pallas_gpu")
# Tiles small enough that the tiny cases span several of them in both directions. The
# TPU sizes are only legal in interpret mode; the GPU ones are powers of two >= 16.
TINY_BLOCKS = {
    "pallas_tpu": BlockSizes(block_q=8, block_kv=16, block_q_bwd=8, block_kv_bwd=16),
    "pallas_gpu": BlockSizes(block_q=16, block_kv=16, block_q_bwd=16, block_kv_bwd=16),
}

DEFAULT_CASES = [
    # Flamingo cross-attention: text before the first image, several images per row, a
    # row that saw only one image, query length not a multiple of the tile.
    Case("flamingo_immediate_media", batch=2, query_length=21, images=3, latents=8,
         heads=1, kv_heads=1),
    Case("flamingo_all_previous_media", batch=2, query_length=21, images=3, latents=8,
         heads=1, kv_heads=1, only_attend_immediate_media=False),
    # Packed causal self-attention with ragged segments, grouped-query heads, ragged length.
    Case("causal_ragged_segments_gqa", batch=2, query_length=27, key_length=27, heads=2,
         kv_heads=1, causal=True, segments=True),
    # One decode step over a KV cache whose later slots are unwritten.
    Case("decode_one_query_over_cache", batch=2, query_length=1, key_length=40, heads=2,
         kv_heads=1, causal=True, decode=True),
    # Mistral's window shorter than a tile and than the sequence, MPT's ALiBi, GQA, keys
    # padded to the tile (40 -> 48): whole key tiles before the band are skipped.
    Case("causal_window_alibi_gqa_ragged", batch=1, query_length=40, key_length=40, heads=4,
         kv_heads=2, causal=True, sliding_window=9, alibi=True),
    # A cached decode step under a window, with ALiBi distances from the given positions.
    Case("decode_window_alibi", batch=2, query_length=1, key_length=40, heads=2, kv_heads=1,
         causal=True, decode=True, sliding_window=12, alibi=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda c: c.name)
def test_kernel_output_and_gradients_equal_reference_in_float32(case, backend):
  check_backend_matches_reference(case, backend, jnp.float32, block_sizes=TINY_BLOCKS[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_output_and_gradients_equal_reference_in_bfloat16(backend):
  case = Case("causal_segments_bf16", batch=1, query_length=24, key_length=24, heads=2,
              kv_heads=1, causal=True, segments=True)
  check_backend_matches_reference(case, backend, jnp.bfloat16, block_sizes=TINY_BLOCKS[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_under_a_mesh_splits_batch_and_heads_and_still_equals_reference(backend):
  # Auto axes: jit places the inputs; the API's shard_map splits batch over data and
  # heads over tensor.
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  case = Case("sharded_flamingo", batch=2, query_length=12, images=2, latents=8, heads=2,
              kv_heads=2)
  with jax.set_mesh(mesh):
    check_backend_matches_reference(case, backend, block_sizes=TINY_BLOCKS[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_slopes_split_with_the_heads_under_a_mesh(backend):
  # ALiBi without causal (positions from the indices), keys padded (20 -> tile); heads over
  # tensor: each shard must read its own heads' slopes, not the first ones.
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  case = Case("sharded_bidirectional_alibi", batch=2, query_length=12, key_length=20, heads=2,
              kv_heads=2, alibi=True)
  with jax.set_mesh(mesh):
    check_backend_matches_reference(case, backend, block_sizes=TINY_BLOCKS[backend])


def test_alibi_slopes_get_no_gradient_on_any_backend():
  case = Case("alibi", query_length=16, key_length=16, causal=True, alibi=True)
  (q, k, v), kwargs = make_inputs(case)
  slopes = kwargs.pop("alibi_slopes")
  for backend in ("xla", "pallas_gpu"):
    loss = lambda s: jnp.sum(attention(q, k, v, **kwargs, alibi_slopes=s, backend=backend,
                                       interpret=True, block_sizes=TINY_BLOCKS.get(backend)))
    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(slopes)), 0.0)


def test_rows_with_no_allowed_key_output_zeros_and_get_zero_query_gradient():
  case = Case("text_before_image", batch=1, query_length=8, images=1, latents=16)
  (q, k, v), kwargs = make_inputs(case)
  kwargs["query_image_index"] = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]], jnp.int32)
  for backend in BACKENDS:
    f = lambda q, k, v: attention(q, k, v, **kwargs, backend=backend, interpret=True,
                                  block_sizes=TINY_BLOCKS[backend])
    out, pullback = jax.vjp(f, q, k, v)
    dq = pullback(jnp.ones_like(out))[0]
    np.testing.assert_array_equal(np.asarray(out[0, :3]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[0, :3]), 0.0)
    assert np.all(np.abs(np.asarray(out[0, 3:])) > 0)


def test_force_interpret_runs_pallas_backends_without_an_interpret_argument():
  case = Case("causal", query_length=16, key_length=16, causal=True)
  (q, k, v), kwargs = make_inputs(case)
  with force_interpret():
    out = attention(q, k, v, **kwargs, backend=api.AttentionBackend.PALLAS_GPU)
  assert rel_err(out, reference.attention_reference(q, k, v, **kwargs)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    Case("flamingo_gqa_immediate", batch=3, query_length=45, images=4, latents=16, heads=4,
         kv_heads=2),
    Case("flamingo_gqa_all_previous", batch=3, query_length=45, images=4, latents=16, heads=4,
         kv_heads=2, only_attend_immediate_media=False),
    Case("causal_segments_long", batch=1, query_length=130, key_length=130, heads=2,
         kv_heads=1, causal=True, segments=True, head_dim=32),
    Case("bidirectional_segments", batch=2, query_length=50, key_length=50, heads=2,
         kv_heads=2, segments=True),
    Case("bidirectional_cross_ragged", batch=2, query_length=33, key_length=70, heads=2,
         kv_heads=1),
    Case("decode_over_long_cache", batch=3, query_length=1, key_length=100, heads=4,
         kv_heads=2, causal=True, decode=True),
    Case("flamingo_many_short_images_gqa", batch=2, query_length=40, images=6,
         latents=4, heads=2, kv_heads=1),
    Case("causal_window_alibi_segments_long", batch=1, query_length=100, key_length=100,
         heads=2, kv_heads=1, causal=True, segments=True, sliding_window=30, alibi=True,
         head_dim=32),
    Case("window_longer_than_sequence", batch=1, query_length=30, key_length=30, heads=2,
         kv_heads=2, causal=True, sliding_window=64),
    # (A window of 1 makes every softmax one-hot: dq and dk are 0 up to rounding, which a
    # relative error cannot judge; 2 is the narrowest band with a gradient.)
    Case("window_of_two_sees_itself_and_the_previous", batch=1, query_length=30,
         key_length=30, heads=2, kv_heads=1, causal=True, sliding_window=2),
    Case("bidirectional_alibi_cross_ragged", batch=2, query_length=33, key_length=70,
         heads=2, kv_heads=1, alibi=True),
    Case("decode_window_alibi_long_cache", batch=3, query_length=1, key_length=100, heads=4,
         kv_heads=2, causal=True, decode=True, sliding_window=20, alibi=True),
], ids=lambda c: c.name)
def test_kernel_equals_reference_on_the_larger_grid(case, backend, dtype):
  check_backend_matches_reference(case, backend, dtype, block_sizes=TINY_BLOCKS[backend])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_with_default_block_sizes_equals_reference(backend):
  case = Case("causal_segments_default_tiles", batch=1, query_length=300, key_length=300,
              heads=2, kv_heads=1, causal=True, segments=True, head_dim=64)
  check_backend_matches_reference(case, backend)
