"""PerceiverResampler: fixed latent count, float64 numpy reference, per-image independence, errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.perceiver import PerceiverConfig, PerceiverResampler

CONFIG = PerceiverConfig(width=16, depth=2, num_heads=2, head_dim=4, num_latents=3, ff_mult=2,
                         max_num_frames=2, max_num_media=3)
# One input shape [B, N, F, P, D] for every compiled call: compiles dominate these tests' time.
SHAPE = (2, 3, 2, 5, 16)


@functools.cache
def _jitted(config):
  """(init, apply) compiled once per config and shape: compiles dominate these tests' time."""
  return jax.jit(PerceiverResampler(config).init), jax.jit(PerceiverResampler(config).apply)


def _init(config, x):
  params = nn.unbox(_jitted(config)[0](jax.random.key(0), x)["params"])
  # Norm params start at (1, 0): perturb them so the reference checks their use.
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32)
      if "norm" in jax.tree_util.keystr(path) else p, params)


def _layer_norm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  from math import erf  # pylint: disable=g-import-not-at-top
  return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def _numpy_resampler(params, x, c):
  """Float64 transcription of open_flamingo's PerceiverResampler.forward."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, n, f, v, d = x.shape
  x = x + p["frame_embs"][:f][None, None, :, None, :]
  x = x.reshape(b, n, f * v, d) + p["media_time_embs"][:n][None, :, None, :]
  lat = np.broadcast_to(p["latents"], (b, n, c.num_latents, d))
  for i in range(c.depth):
    a, ff = p[f"layers_{i}"]["attn"], p[f"layers_{i}"]["ff"]
    xm = _layer_norm(x, a["norm_media"], c.norm_eps)
    ln = _layer_norm(lat, a["norm_latents"], c.norm_eps)
    q = np.einsum("bnld,dhk->bnhlk", ln, a["to_q"]["kernel"]) * c.head_dim**-0.5
    kv_in = np.concatenate([xm, ln], axis=2)
    kv = np.einsum("bnsd,dchk->cbnhsk", kv_in, a["to_kv"]["kernel"])
    s = np.einsum("bnhlk,bnhsk->bnhls", q, kv[0])
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bnhls,bnhsk->bnlhk", w, kv[1])
    lat = lat + np.einsum("bnlhk,hkd->bnld", o, a["to_out"]["kernel"])
    h = _gelu(_layer_norm(lat, ff["norm"], c.norm_eps) @ ff["fc1"]["kernel"])
    lat = lat + h @ ff["fc2"]["kernel"]
  return _layer_norm(lat, p["norm"], c.norm_eps)


def test_resampler_matches_a_float64_numpy_transcription_of_the_reference():
  x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
  params = _init(CONFIG, jnp.asarray(x))
  got = _jitted(CONFIG)[1]({"params": params}, jnp.asarray(x))
  want = _numpy_resampler(params, x.astype(np.float64), CONFIG)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


def test_output_has_num_latents_tokens_whatever_the_number_of_patches():
  params = _init(CONFIG, jnp.ones(SHAPE, jnp.float32))
  for frames, patches in [(1, 1), (1, 9), (2, 5), (1, 257)]:
    x = jax.ShapeDtypeStruct((2, 3, frames, patches, 16), jnp.float32)
    out = jax.eval_shape(PerceiverResampler(CONFIG).apply, {"params": params}, x)
    assert out.shape == (2, 3, CONFIG.num_latents, 16)


def test_each_image_is_resampled_independently_of_the_others():
  rng = np.random.default_rng(2)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  params = _init(CONFIG, jnp.asarray(x))
  apply = _jitted(CONFIG)[1]
  base = np.asarray(apply({"params": params}, jnp.asarray(x)))
  x2 = x.copy()
  # Not a constant shift: norm_media would remove it.
  x2[0, 1] += rng.standard_normal(x2[0, 1].shape).astype(np.float32)
  moved = np.asarray(apply({"params": params}, jnp.asarray(x2)))
  np.testing.assert_allclose(moved[0, [0, 2]], base[0, [0, 2]], atol=1e-6, rtol=0)
  assert np.abs(moved[0, 1] - base[0, 1]).max() > 1e-3


def test_media_time_embeddings_make_identical_images_differ_by_position():
  x = np.tile(np.random.default_rng(3).standard_normal((2, 1, 2, 5, 16)), (1, 3, 1, 1, 1))
  params = _init(CONFIG, jnp.asarray(x, jnp.float32))
  out = np.asarray(_jitted(CONFIG)[1]({"params": params}, jnp.asarray(x, jnp.float32)))
  assert np.abs(out[0, 0] - out[0, 1]).max() > 1e-3
  plain = PerceiverConfig(**{**CONFIG.__dict__, "max_num_media": None})
  plain_params = {k: v for k, v in params.items() if k != "media_time_embs"}
  out = np.asarray(_jitted(plain)[1]({"params": plain_params}, jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(out[0, 0], out[0, 1], atol=1e-6)


@pytest.mark.parametrize("shape,match", [
    ((2, 3, 5, 16), "rank 5"),
    ((1, 1, 1, 4, 8), "width 8"),
    ((1, 1, 3, 4, 16), "3 frames"),
    ((1, 4, 1, 4, 16), "4 media per example"),
])
def test_bad_media_shapes_raise_a_value_error_naming_them(shape, match):
  with pytest.raises(ValueError, match=match):
    PerceiverResampler(CONFIG).init(jax.random.key(0), jnp.zeros(shape, jnp.float32))


def test_params_carry_logical_axis_names_and_the_open_flamingo_layout():
  x = jnp.zeros((1, 1, 1, 4, 16), jnp.float32)
  boxed = jax.eval_shape(PerceiverResampler(CONFIG).init, jax.random.key(0), x)["params"]
  specs = nn.get_partition_spec(boxed)
  assert specs["latents"] == jax.sharding.PartitionSpec("latents", "embed")
  assert specs["layers_1"]["attn"]["to_kv"]["kernel"] == jax.sharding.PartitionSpec("embed", None, "heads", "kv")
  assert set(boxed["layers_0"]["attn"]) == {"norm_media", "norm_latents", "to_q", "to_kv", "to_out"}
  assert set(boxed["layers_0"]["ff"]) == {"norm", "fc1", "fc2"}
