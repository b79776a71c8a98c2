"""The XLA attention's own backward pass (`reference._attend`, the flash identity over a
heads-major layout) equals JAX's differentiation of the plain grouped computation.

Outside rematerialisation `attention_reference` takes the heads-major path with a custom
VJP; under `remat.rematerialised()` it keeps the grouped path that JAX differentiates
(so that checkpoint policies see its products). Both must give the same values and
gradients on every part of the mask language; float64 makes any difference in the
backward's algebra show far above rounding.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.kernels.attention import reference
from mmjax.kernels import remat
from tests.kernels.cases import Case, make_inputs, outputs_and_grads, rel_err

CASES = [
    Case("flamingo_immediate_media", batch=2, query_length=21, images=3, latents=8, heads=2, kv_heads=2),
    Case("flamingo_all_previous_media", batch=2, query_length=21, images=3, latents=8, heads=1, kv_heads=1,
         only_attend_immediate_media=False),
    Case("causal_ragged_segments_gqa", batch=2, query_length=27, key_length=27, heads=4, kv_heads=2,
         causal=True, segments=True),
    Case("decode_one_query_over_cache", batch=2, query_length=1, key_length=40, heads=2, kv_heads=1,
         causal=True, decode=True),
    Case("causal_window_alibi_gqa", batch=1, query_length=40, key_length=40, heads=4, kv_heads=2,
         causal=True, sliding_window=9, alibi=True),
    Case("cross_attention_no_mask", batch=3, query_length=7, key_length=12, heads=3, kv_heads=3),
    # Causal over the indices from 128 rows on goes in blocks (2 of 65 rows here; 3 of 67, 67
    # and 66 below), each over the keys up to its end, with segments, a window and ALiBi.
    Case("causal_blocks_ragged_segments", batch=2, query_length=130, key_length=130, heads=4, kv_heads=2,
         head_dim=8, causal=True, segments=True),
    Case("causal_blocks_window_alibi", batch=1, query_length=200, key_length=200, heads=2, kv_heads=1,
         head_dim=8, causal=True, sliding_window=70, alibi=True),
]


def _both(case, dtype):
  qkv, kwargs = make_inputs(case, dtype)
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(qkv[0].shape), dtype)
  fn = lambda q, k, v: reference.attention_reference(q, k, v, **kwargs)

  def grouped(q, k, v):
    with remat.rematerialised():
      return fn(q, k, v)
  return outputs_and_grads(fn, qkv, cotangent), outputs_and_grads(grouped, qkv, cotangent)


@pytest.fixture
def float64():
  before = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_own_backward_equals_jax_differentiation_in_float64(case, float64):
  (out, grads), (want_out, want_grads) = _both(case, jnp.float64)
  assert out.dtype == jnp.float64
  errors = {"out": rel_err(out, want_out),
            **{n: rel_err(g, w) for n, g, w in zip(("dq", "dk", "dv"), grads, want_grads)}}
  assert all(e <= 1e-12 for e in errors.values()), f"{case.name}: {errors}"


@pytest.mark.parametrize("length, blocks", [(64, 1), (127, 1), (128, 2), (200, 3), (256, 4), (1024, 8)])
def test_causal_attention_over_the_indices_goes_in_blocks(length, blocks):
  q = jnp.zeros((1, length, 2, 8))
  k = jnp.zeros((1, length, 1, 8))
  jaxpr = str(jax.make_jaxpr(lambda q, k: reference.attention_reference(q, k, k, causal=True))(q, k))
  assert jaxpr.count("custom_vjp_call") == blocks
  # Given positions may not follow the indices (left padding): no blocks then.
  positions = jnp.zeros((1, length), jnp.int32)
  jaxpr = str(jax.make_jaxpr(lambda q, k: reference.attention_reference(
      q, k, k, causal=True, query_positions=positions, key_positions=positions))(q, k))
  assert jaxpr.count("custom_vjp_call") == 1


def test_own_backward_in_float32_and_bfloat16():
  case = CASES[2]
  for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    (out, grads), (want_out, want_grads) = _both(case, dtype)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads)):
      assert rel_err(got, want) <= tolerance, (dtype, name, rel_err(got, want))


def test_rows_with_no_allowed_key_get_zeros_and_finite_gradients():
  # Row 0 of the media case has text before its first image: those queries see no key.
  case = CASES[0]
  (q, k, v), kwargs = make_inputs(case)
  out, grads = outputs_and_grads(lambda *a: reference.attention_reference(*a, **kwargs), (q, k, v),
                                 jnp.ones_like(q))
  empty = np.asarray(kwargs["query_image_index"]) == 0
  assert empty.any()
  assert np.all(np.asarray(out)[empty] == 0)
  assert np.all(np.asarray(grads[0])[empty] == 0)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_the_two_paths_differ_only_in_how_the_products_are_laid_out():
  """The heads-major path's compiled gradient holds no transpose of the [T, S] probabilities
  (what made XLA:CPU slow), the grouped path's does: the reason the former exists."""
  case = Case("gqa", batch=2, query_length=64, key_length=80, heads=4, kv_heads=2)
  (q, k, v), kwargs = make_inputs(case)
  loss = lambda q, k, v: jnp.sum(reference.attention_reference(q, k, v, **kwargs) ** 2)

  def grouped_loss(q, k, v):
    with remat.rematerialised():
      return loss(q, k, v)

  def big_transposes(f):
    text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    # Entry-level copies whose element count is that of the logits, [B, H, T, S] = 40960.
    return [line for line in entry.splitlines()
            if ("copy" in line.split("=")[0] or "transpose" in line.split("=")[0])
            and any(np.prod([int(d) for d in shape.split(",")]) == 2 * 4 * 64 * 80
                    for shape in re.findall(r"f32\[([\d,]+)\]", line.split("=")[1][:60]))]
  assert big_transposes(grouped_loss), "the grouped path no longer copies the probabilities: revisit _heads_major"
  assert not big_transposes(loss)
