"""The LLaMA-style decoder: cross-attention placement as open_flamingo, cached decoding
equal to the full forward pass, media K/V reuse, tied embeddings."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.decoder import Decoder, DecoderConfig
from mmjax.models.scan_layout import insert_layer_indices
from tests.models import xdecoder

CONFIG = DecoderConfig(vocab_size=40, width=32, depth=4, num_heads=4, num_kv_heads=2, head_dim=8,
                       mlp_dim=48, max_length=32, rope_theta=1234.0)
N = 2  # cross-attention before every N-th layer


def _random_params(config, media_shape=(1, 1, 2, 16), seed=0, n=N):
  shapes = nn.unbox(xdecoder.init_shapes(
      config, n, jnp.zeros((1, 3), jnp.int32), image_index=jnp.zeros((1, 3), jnp.int32),
      media=jnp.zeros(media_shape, jnp.float32) if n else None))
  rng = np.random.default_rng(seed)
  def draw(leaf):
    fan_in = leaf.shape[0] if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in) + (len(leaf.shape) == 1),
                       jnp.float32)
  return jax.tree.map(draw, shapes)


@pytest.mark.parametrize("n, depth, want", [
    (1, 3, (0, 1, 2)), (2, 4, (1, 3)), (4, 32, (3, 7, 11, 15, 19, 23, 27, 31)), (0, 4, ()),
    (7, 80, (6, 13, 20, 27, 34, 41, 48, 55, 62, 69, 76)),
])
def test_cross_attention_sits_before_the_layers_open_flamingo_picks(n, depth, want):
  # open_flamingo's FlamingoLMMixin.init_flamingo: a block where (layer_idx + 1) % n == 0.
  assert insert_layer_indices(depth, xdecoder.insert(n)) == want == tuple(i for i in range(depth) if n and (i + 1) % n == 0)


def test_params_hold_one_xattn_module_per_chosen_layer_and_no_lm_head_when_tied():
  params = _random_params(CONFIG)["params"]
  assert sorted(k for k in params if k.startswith("xattn_")) == ["xattn_1", "xattn_3"]
  assert "lm_head" in params
  tied = _random_params(dataclasses.replace(CONFIG, tie_embeddings=True))["params"]
  plain = _random_params(CONFIG, n=0)["params"]
  assert not any(k.startswith("xattn") for k in plain)
  assert "lm_head" not in tied


def test_cached_prefill_then_one_token_steps_give_the_full_forward_logits():
  params = _random_params(CONFIG)
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(0, 40, (2, 9)), jnp.int32)
  image_index = jnp.asarray([[0, 1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  media = jnp.asarray(rng.standard_normal((2, 2, 3, 16)), jnp.float32)
  full, _ = jax.jit(lambda p: xdecoder.apply(CONFIG, N, p, ids, image_index, media))(params)

  media_kv = xdecoder.media_kv(CONFIG, N, params, media)
  step = jax.jit(lambda ids, ii, pos, cache: xdecoder.apply(
      CONFIG, N, params, ids, image_index=ii, media_kv=media_kv, positions=pos, cache=cache))
  cache = xdecoder.cache(CONFIG, N, 2, 16)
  pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
  logits, cache = step(ids[:, :5], image_index[:, :5], pos, cache)
  steps = [logits]
  for t in range(5, 9):
    logits, cache = step(ids[:, t:t + 1], image_index[:, t:t + 1], jnp.full((2, 1), t, jnp.int32),
                         cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=0)


def test_text_before_the_first_image_does_not_depend_on_the_images():
  params = _random_params(CONFIG)
  rng = np.random.default_rng(2)
  ids = jnp.asarray(rng.integers(0, 40, (1, 6)), jnp.int32)
  image_index = jnp.asarray([[0, 0, 0, 1, 1, 1]], jnp.int32)
  apply = jax.jit(lambda p, ii, m: xdecoder.apply(CONFIG, N, p, ids, ii, m))
  a, _ = apply(params, image_index, jnp.asarray(rng.standard_normal((1, 1, 3, 16)), jnp.float32))
  b, _ = apply(params, image_index, jnp.asarray(rng.standard_normal((1, 1, 3, 16)), jnp.float32))
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
  assert np.abs(np.asarray(a[:, 3:] - b[:, 3:])).min() > 1e-4


def test_decoder_with_cross_attention_requires_exactly_one_of_media_and_media_kv():
  params = _random_params(CONFIG)
  ids = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="exactly one of media and media_kv"):
    xdecoder.apply(CONFIG, N, params, ids, image_index=jnp.zeros((1, 3), jnp.int32))


def test_the_decoder_over_embeddings_equals_it_over_ids():
  """embed -> forward -> logits is the same function as the decoder over ids (what LLaVA and
  BLIP-2 splice their image tokens into)."""
  config = dataclasses.replace(CONFIG, tie_embeddings=False)
  model = Decoder(config)
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 40, (2, 7)), jnp.int32)
  params = model.init(jax.random.key(1), ids)
  want, _ = model.apply(params, ids)
  x = model.apply(params, ids, method=lambda m, i: m.embed(i))
  got, _ = model.apply(params, embeddings=x)
  hidden, _ = model.apply(params, x, method=Decoder.forward)
  parts = model.apply(params, hidden, method=Decoder.logits)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(parts), np.asarray(want))
  with pytest.raises(ValueError, match="exactly one of input_ids and embeddings"):
    model.apply(params, ids, embeddings=x)
  with pytest.raises(ValueError, match=r"expected \[batch, length, 32\]"):
    model.apply(params, embeddings=x[..., :16])


# The unscanned case (18 s on 2 cores) in the slow tier; the scanned one stays in the default.
@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])
def test_packed_sequences_with_segment_ids_give_each_sequence_its_own_logits(scan):
  """Two sequences in one row (segment ids 1, 2; positions restarting; padding 0) give the
  logits each gives alone: no token sees another segment, unrolled or scanned."""
  config = DecoderConfig(vocab_size=40, width=32, depth=4, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                         max_length=32, scan_layers=scan)
  model = Decoder(config)
  rng = np.random.default_rng(0)
  a, b = rng.integers(1, 40, (1, 5)), rng.integers(1, 40, (1, 7))
  params = model.init(jax.random.key(0), jnp.asarray(a))
  alone = [np.asarray(model.apply(params, jnp.asarray(x))[0]) for x in (a, b)]
  packed = np.concatenate([a, b, np.zeros((1, 3), a.dtype)], axis=1)
  segments = np.asarray([[1] * 5 + [2] * 7 + [0] * 3])
  positions = np.asarray([list(range(5)) + list(range(7)) + [0] * 3])
  logits, _ = model.apply(params, jnp.asarray(packed), positions=jnp.asarray(positions),
                          segment_ids=jnp.asarray(segments))
  np.testing.assert_allclose(np.asarray(logits)[:, :5], alone[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(logits)[:, 5:12], alone[1], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="segment_ids have shape"):
    model.apply(params, jnp.asarray(packed), segment_ids=jnp.ones((1, 4), jnp.int32))
