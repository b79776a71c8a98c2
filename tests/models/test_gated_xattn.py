"""GatedXAttnDense: identity at init, zero cross-attention before the first image, both media
masks against a float64 numpy computation, cached media keys/values, bad inputs."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.gated_xattn import GatedXAttnConfig, GatedXAttnDense, media_key_image_ids

D, DM, H, K, N, L, T = 16, 8, 2, 4, 3, 2, 10
CONFIG = GatedXAttnConfig(width=D, media_width=DM, num_heads=H, head_dim=K, ff_mult=2)
# Example 0: text before the first image, three images; example 1: an image at position 0.
IMAGE_POSITIONS = ([2, 5, 8], [0, 6])


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, T, D)).astype(np.float32)
  media = rng.standard_normal((2, N, L, DM)).astype(np.float32)
  is_image = np.zeros((2, T), bool)
  for b, pos in enumerate(IMAGE_POSITIONS):
    is_image[b, pos] = True
  image_index = np.cumsum(is_image, axis=1).astype(np.int32)
  return x, media, image_index


@functools.cache
def _jitted(config, num_latents=None):
  """(init, apply) compiled once per config: compiles dominate these tests' time."""
  init = jax.jit(GatedXAttnDense(config).init)
  apply = jax.jit(lambda p, x, i, kw: GatedXAttnDense(config).apply(
      {"params": p}, x, i, num_latents=num_latents, **kw))
  return init, apply


def _params(config, attn_gate=0.0, ff_gate=0.0):
  x, media, image_index = _inputs()
  params = nn.unbox(_jitted(config)[0](
      jax.random.key(1), jnp.asarray(x), jnp.asarray(image_index), media=jnp.asarray(media))["params"])
  params = dict(params, attn_gate=jnp.full((1,), attn_gate, jnp.float32),
                ff_gate=jnp.full((1,), ff_gate, jnp.float32))
  rng = np.random.default_rng(2)
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32)
      if "norm" in jax.tree_util.keystr(path) else p, params)


def _apply(config, params, x, image_index, num_latents=None, **kw):
  fn = _jitted(config, num_latents)[1]
  return np.asarray(fn(params, jnp.asarray(x), jnp.asarray(image_index), kw))


def _layer_norm(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _numpy_block(params, x, media, image_index, only_immediate):
  """Float64: explicit per-(token, image) mask; tokens with no visible image get zero attention."""
  from math import erf  # pylint: disable=g-import-not-at-top
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  a = p["attn"]
  b, t, _ = x.shape
  q = np.einsum("btd,dhk->bhtk", _layer_norm(x, a["norm"]), a["to_q"]["kernel"]) * K**-0.5
  kv = np.einsum("bsd,dchk->cbhsk", media.reshape(b, N * L, DM), a["to_kv"]["kernel"])
  key_image = np.repeat(np.arange(1, N + 1), L)
  out = np.zeros((b, t, D))
  for bi in range(b):
    for ti in range(t):
      n = image_index[bi, ti]
      visible = (key_image == n) if only_immediate else (key_image <= n)
      if n == 0 or not visible.any():
        continue  # zero cross-attention output
      s = np.einsum("hk,hsk->hs", q[bi, :, ti], kv[0, bi][:, visible])
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      o = np.einsum("hs,hsk->hk", w, kv[1, bi][:, visible])
      out[bi, ti] = np.einsum("hk,hkd->d", o, a["to_out"]["kernel"])
  y = x + np.tanh(p["attn_gate"]) * out
  h = _layer_norm(y, p["ff"]["norm"]) @ p["ff"]["fc1"]["kernel"]
  h = 0.5 * h * (1 + np.vectorize(erf)(h / np.sqrt(2)))
  return y + np.tanh(p["ff_gate"]) * (h @ p["ff"]["fc2"]["kernel"])


def test_gates_start_at_zero_so_a_fresh_block_is_the_identity():
  x, media, image_index = _inputs()
  params = nn.unbox(_jitted(CONFIG)[0](jax.random.key(0), jnp.asarray(x), jnp.asarray(image_index),
                                        media=jnp.asarray(media))["params"])
  assert float(params["attn_gate"][0]) == 0.0 and float(params["ff_gate"][0]) == 0.0
  np.testing.assert_array_equal(_apply(CONFIG, params, x, image_index, media=media), x)


@pytest.mark.parametrize("only_immediate", [True, False])
def test_both_media_masks_match_a_float64_numpy_computation(only_immediate):
  config = GatedXAttnConfig(**{**CONFIG.__dict__, "only_attend_immediate_media": only_immediate})
  params = _params(config, attn_gate=0.8, ff_gate=-0.6)
  x, media, image_index = _inputs()
  got = _apply(config, params, x, image_index, media=media)
  want = _numpy_block(params, x.astype(np.float64), media.astype(np.float64), image_index, only_immediate)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("only_immediate", [True, False])
def test_a_token_before_the_first_image_gets_zero_cross_attention(only_immediate):
  config = GatedXAttnConfig(**{**CONFIG.__dict__, "only_attend_immediate_media": only_immediate})
  params = _params(config, attn_gate=1.5, ff_gate=0.0)  # ff off: the output is x + xattn
  x, media, image_index = _inputs()
  got = _apply(config, params, x, image_index, media=media)
  before = image_index == 0
  assert before.sum() == 2
  np.testing.assert_array_equal(got[before], x[before])
  assert np.abs(got[~before] - x[~before]).min() > 0  # every other token does attend


def test_only_attend_immediate_media_reads_one_image_and_all_previous_reads_every_earlier_one():
  x, media, image_index = _inputs()
  for only_immediate in (True, False):
    config = GatedXAttnConfig(**{**CONFIG.__dict__, "only_attend_immediate_media": only_immediate})
    params = _params(config, attn_gate=1.0)
    base = _apply(config, params, x, image_index, media=media)
    changed = media.copy()
    changed[0, 0] += 1.0  # image 1 of example 0 (tokens 2..4 follow it directly)
    moved = np.abs(_apply(config, params, x, image_index, media=changed) - base).max(-1)[0] > 1e-6
    want = (image_index[0] == 1) if only_immediate else (image_index[0] >= 1)
    np.testing.assert_array_equal(moved, want)


def test_cached_media_keys_values_give_the_same_output_as_media():
  params = _params(CONFIG, attn_gate=0.5, ff_gate=0.5)
  x, media, image_index = _inputs()
  model = GatedXAttnDense(CONFIG)
  kv = model.apply({"params": params}, jnp.asarray(media), method=GatedXAttnDense.compute_media_kv)
  assert kv["key"].shape == kv["value"].shape == (2, N * L, H, K)
  np.testing.assert_array_equal(np.asarray(kv["key_image_ids"][0]), [1, 1, 2, 2, 3, 3])
  want = _apply(CONFIG, params, x, image_index, media=media)
  np.testing.assert_allclose(_apply(CONFIG, params, x, image_index, media_kv=kv), want, atol=1e-6)
  bare = {"key": kv["key"], "value": kv["value"]}
  np.testing.assert_allclose(_apply(CONFIG, params, x, image_index, media_kv=bare, num_latents=L), want,
                             atol=1e-6)


def test_bad_inputs_raise_value_errors_naming_them():
  params = _params(CONFIG)
  x, media, image_index = _inputs()
  model = GatedXAttnDense(CONFIG)
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  with pytest.raises(ValueError, match="exactly one of media and media_kv"):
    apply(x, image_index)
  with pytest.raises(ValueError, match="exactly one of media and media_kv"):
    apply(x, image_index, media=media, media_kv={})
  with pytest.raises(ValueError, match="image_index has shape"):
    apply(x, image_index[:, :3], media=media)
  with pytest.raises(ValueError, match="media have width 5"):
    apply(x, image_index, media=media[..., :5])
  with pytest.raises(ValueError, match="num_latents"):
    apply(x, image_index, media_kv={"key": jnp.zeros((2, 6, H, K)), "value": jnp.zeros((2, 6, H, K))})


def test_media_key_image_ids_number_the_latents_of_each_image_from_one():
  np.testing.assert_array_equal(np.asarray(media_key_image_ids(1, 2, 3)), [[1, 1, 1, 2, 2, 2]])
