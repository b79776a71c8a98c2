"""VisionTransformer: shapes, CLS on/off, penultimate output, position-embedding resizing,
bad input, a float64 numpy reference forward, and the big presets under jax.eval_shape.

The HF CLIP / SigLIP numerics are checked in tests/parity/test_hf_vision.py.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from mmjax.layers.posemb import sincos_2d
from mmjax.models import vit

TINY = vit.VIT_TINY


def _param_shapes(config: vit.ViTConfig):
  """The unboxed param tree of ShapeDtypeStructs, from jax.eval_shape (nothing compiled)."""
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  return nn.unbox(jax.eval_shape(vit.VisionTransformer(config).init, jax.random.key(0), images)["params"])


def _init(config: vit.ViTConfig, seed: int = 0):
  """(model, random float32 params): numpy draws, 0.1-scaled, so norms and biases matter.

  Compiling flax's own init (threefry per parameter) costs seconds on CPU; tests need
  only some non-trivial values.
  """
  rng = np.random.default_rng(seed)
  def draw(path, x):
    name = jax.tree_util.keystr(path)
    base = 1.0 if "'scale'" in name else 0.0
    std = 0.02 if "'pos_embedding'" in name or "'cls_token'" in name else 0.1
    return (base + std * rng.standard_normal(x.shape)).astype(np.float32)
  return vit.VisionTransformer(config), jax.tree_util.tree_map_with_path(draw, _param_shapes(config))


@functools.cache
def _jitted_apply(config: vit.ViTConfig):
  return jax.jit(vit.VisionTransformer(config).apply)


def _apply(model, params, images):
  return _jitted_apply(model.config)({"params": params}, images)


def _images(batch: int, height: int, width: int | None = None, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, height, width or height, 3), jnp.float32)


@pytest.fixture(scope="module")
def tiny():
  return _init(TINY)


def _features(model, params, images):
  return jax.jit(lambda p, x: model.apply({"params": p}, x, method=vit.VisionTransformer.features))(params, images)


def test_tokens_are_one_per_patch_plus_the_cls_token(tiny):
  model, params = tiny
  out = _apply(model, params, _images(2, 32))
  assert out.shape == (2, 1 + 8 * 8, 64)
  assert out.dtype == jnp.float32


def test_without_cls_token_there_is_one_token_per_patch_and_no_cls_param():
  config = dataclasses.replace(TINY, class_token=False)
  model, params = _init(config)
  assert "cls_token" not in params and params["pos_embedding"].shape == (64, 64)
  assert _apply(model, params, _images(2, 32)).shape == (2, 64, 64)


def test_pooled_is_the_post_normed_cls_token(tiny):
  model, params = tiny
  f = _features(model, params, _images(2, 32))
  np.testing.assert_array_equal(f["pooled"], f["tokens"][:, 0])


def test_penultimate_output_equals_a_tower_one_block_shorter(tiny):
  model, params = tiny
  images = _images(2, 32)
  penultimate = vit.VisionTransformer(dataclasses.replace(TINY, output_layer=-2))
  shorter = vit.VisionTransformer(dataclasses.replace(TINY, depth=1))
  shorter_params = {k: v for k, v in params.items() if k != "layers_1"}
  got = _apply(penultimate, params, images)
  np.testing.assert_allclose(got, _apply(shorter, shorter_params, images), atol=1e-6)
  last = _apply(model, params, images)
  assert np.max(np.abs(got - last)) > 1e-2


def test_penultimate_tower_has_the_same_parameters_as_the_last_layer_tower(tiny):
  _, params = tiny
  penultimate = _param_shapes(dataclasses.replace(TINY, output_layer=-2))
  assert jax.tree.map(np.shape, penultimate) == jax.tree.map(np.shape, params)


def test_native_resolution_uses_the_position_embeddings_unchanged(tiny):
  _, params = tiny
  pos = jnp.asarray(params["pos_embedding"][1:])
  np.testing.assert_array_equal(vit.resize_posemb(pos, (8, 8)), pos)


def test_resized_position_embeddings_keep_constants_and_follow_the_grid():
  # Bicubic weights sum to one (constants survive) and are symmetric about the centre.
  const = jnp.full((16, 4), 0.5, jnp.float32)
  np.testing.assert_allclose(vit.resize_posemb(const, (6, 9)), np.full((54, 4), 0.5), atol=1e-6)
  ramp = jnp.asarray(np.tile(np.arange(4.0, dtype=np.float32), 4)[:, None])  # x coordinate
  out = np.asarray(vit.resize_posemb(ramp, (4, 8))).reshape(4, 8)
  np.testing.assert_allclose(out + out[:, ::-1], np.full((4, 8), 3.0), atol=1e-5)
  assert np.all(np.diff(out, axis=1) >= -1e-6)  # still increasing along x
  np.testing.assert_allclose(out[0], out[3], atol=1e-6)  # constant along y


def test_other_resolutions_give_their_own_patch_count(tiny):
  model, params = tiny
  out = jax.eval_shape(functools.partial(model.apply, {"params": params}), _images(1, 48, 40))
  assert out.shape == (1, 1 + 12 * 10, 64)
  # Pixels past the last whole patch are dropped, as a strided torch Conv2d does.
  images = _images(2, 34, 35)
  np.testing.assert_array_equal(_apply(model, params, images), _apply(model, params, images[:, :32, :32]))


def _np_layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_conv_stem(p, images: np.ndarray) -> np.ndarray:
  """float64 ConvStem: 3x3 stride-2 convolutions padded by 1, exact GELU, then a 1x1."""
  x = images
  i = 0
  while f"conv_{i}_kernel" in p:
    kernel, (b, h, w, _) = p[f"conv_{i}_kernel"], x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h // 2, w // 2, kernel.shape[-1]))
    for dy in range(3):
      for dx in range(3):
        out += padded[:, dy:dy + h:2, dx:dx + w:2, :] @ kernel[dy, dx]
    out += p[f"conv_{i}_bias"]
    x = 0.5 * out * (1 + scipy.special.erf(out / np.sqrt(2)))
    i += 1
  x = x @ p["proj_kernel"] + p["proj_bias"]
  return x.reshape(x.shape[0], -1, x.shape[-1])


def _np_reference(config: vit.ViTConfig, params, images: np.ndarray) -> np.ndarray:
  """float64 forward of a tower with sincos posembs, no CLS, post_norm, gelu_tanh."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, h, w, c = images.shape
  s = config.patch_size
  if config.stem == "conv":
    x = _np_conv_stem(p["patch_embed"], images)
  else:
    patches = images.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, s * s * c)
    x = patches @ p["patch_embed"]["kernel"].reshape(s * s * c, -1) + p["patch_embed"]["bias"]
  x = x + sincos_2d(h // s, w // s, config.width).astype(np.float64)
  for i in range(config.depth):
    lp = p[f"layers_{i}"]
    y = _np_layer_norm(x, lp["norm1"]["scale"], lp["norm1"]["bias"], config.norm_eps)
    a = lp["attn"]
    q, k, v = (np.einsum("BPD,DHK->BHPK", y, a[n]["kernel"]) + a[n]["bias"][None, :, None, :]
               for n in ("query", "key", "value"))
    logits = np.einsum("BHPK,BHQK->BHPQ", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("BHPQ,BHQK->BPHK", probs, v)
    x = x + np.einsum("BPHK,HKD->BPD", o, a["out"]["kernel"]) + a["out"]["bias"]
    y = _np_layer_norm(x, lp["norm2"]["scale"], lp["norm2"]["bias"], config.norm_eps)
    m = lp["mlp"]
    y = _np_gelu_tanh(y @ m["fc1"]["kernel"] + m["fc1"]["bias"]) @ m["fc2"]["kernel"] + m["fc2"]["bias"]
    x = x + y
  return _np_layer_norm(x, p["post_norm"]["scale"], p["post_norm"]["bias"], config.norm_eps)


def test_sincos_tower_without_cls_matches_a_float64_numpy_reference():
  config = dataclasses.replace(TINY, class_token=False, posemb="sincos2d", pre_norm=False,
                               activation="gelu_tanh", patch_bias=True, norm_eps=1e-6)
  model, params = _init(config, seed=3)
  assert "pos_embedding" not in params
  images = np.asarray(_images(2, 32, 24, seed=4))
  got = _apply(model, params, jnp.asarray(images))
  np.testing.assert_allclose(got, _np_reference(config, params, images.astype(np.float64)), atol=1e-4)


def test_bfloat16_compute_stays_close_to_float32(tiny):
  model, params = tiny
  images = _images(2, 32)
  bf16 = vit.VisionTransformer(dataclasses.replace(TINY, dtype="bfloat16"))
  got = _apply(bf16, params, images)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), _apply(model, params, images), atol=0.1)


def test_normalize_images_scales_uint8_and_floats_alike():
  pixels = np.array([[[[0, 128, 255]]]], np.uint8)
  got = vit.normalize_images(pixels, TINY)
  want = (pixels / 255.0 - np.array(TINY.image_mean)) / np.array(TINY.image_std)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(vit.normalize_images(pixels.astype(np.float32) / 255, TINY), got, atol=1e-6)
  siglip = vit.normalize_images(pixels, vit.SIGLIP_SO400M_14)
  np.testing.assert_allclose(siglip, pixels / 127.5 - 1.0, atol=1e-6)


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 32, 32, 4), np.uint8), r"\[\.\.\., H, W, 3\]"),
    (np.zeros((2, 32, 32, 3), np.int32), "dtype int32"),
])
def test_normalize_images_rejects_bad_input(images, match):
  with pytest.raises(ValueError, match=match):
    vit.normalize_images(images, TINY)


@pytest.mark.parametrize("images,match", [
    (jnp.zeros((32, 32, 3), jnp.float32), r"shape \(32, 32, 3\), expected \[B, H, W, 3\]"),
    (jnp.zeros((1, 32, 32, 1), jnp.float32), r"shape \(1, 32, 32, 1\)"),
    (jnp.zeros((1, 32, 32, 3), jnp.uint8), "dtype uint8, expected floats"),
    (jnp.zeros((1, 3, 32, 3), jnp.float32), "smaller than the patch size 4"),
])
def test_bad_images_raise_naming_the_value(tiny, images, match):
  model, params = tiny
  with pytest.raises(ValueError, match=match):
    _apply(model, params, images)


def test_conv_stem_tower_matches_a_float64_numpy_reference():
  config = dataclasses.replace(TINY, stem="conv", class_token=False, posemb="sincos2d", pre_norm=False,
                               activation="gelu_tanh", norm_eps=1e-6)
  model, params = _init(config, seed=5)
  # log2(4) = 2 stride-2 convolutions (32 then 64 channels) and the 1x1 projection.
  shapes = {k: v.shape for k, v in params["patch_embed"].items()}
  assert shapes == {"conv_0_kernel": (3, 3, 3, 32), "conv_0_bias": (32,), "conv_1_kernel": (3, 3, 32, 64),
                    "conv_1_bias": (64,), "proj_kernel": (64, 64), "proj_bias": (64,)}
  images = np.asarray(_images(2, 32, 24, seed=6))
  got = _apply(model, params, jnp.asarray(images))
  assert got.shape == (2, 8 * 6, 64)  # the grid of a 4-pixel patchify stem
  np.testing.assert_allclose(got, _np_reference(config, params, images.astype(np.float64)), atol=1e-4)


def test_conv_stem_tokens_see_across_patch_borders_and_a_patch_stem_does_not():
  images = np.zeros((1, 32, 32, 3), np.float32)
  changed = images.copy()
  changed[0, 3, 3] = 1.0  # the last pixel row and column of the top-left 4 px patch
  for stem, moved in (("patch", [0]), ("conv", [0, 1, 8, 9])):
    config = dataclasses.replace(TINY, stem=stem, class_token=False, posemb="sincos2d", depth=1)
    model, params = _init(config)
    embed = jax.jit(lambda x: model.apply({"params": params}, x, method=vit.VisionTransformer.embed))
    diff = np.abs(np.asarray(embed(changed) - embed(images)))[0].max(-1)
    assert list(np.flatnonzero(diff > 1e-6)) == moved, stem


@pytest.mark.parametrize("change,match", [
    (dict(stem="conv", patch_size=6), "patch_size=6 with stem='conv': expected a power of 2"),
    (dict(stem="hybrid"), "stem='hybrid', expected 'patch' or 'conv'"),
    (dict(num_heads=5), "width=64 is not a multiple of num_heads=5"),
    (dict(output_layer=-3), "output_layer=-3"),
    (dict(output_layer=0), "output_layer=0"),
    (dict(posemb="rope"), "posemb='rope'"),
    (dict(activation="swish"), "activation='swish'"),
])
def test_inconsistent_configs_are_rejected(change, match):
  with pytest.raises(ValueError, match=match):
    _init(dataclasses.replace(TINY, **change))


def test_every_parameter_carries_logical_axis_names():
  config = dataclasses.replace(TINY, class_token=False, patch_bias=True, map_head=True)
  variables = jax.eval_shape(vit.VisionTransformer(config).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = nn.get_partition_spec(variables["params"])
  assert specs["layers_0"]["attn"]["query"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads", "kv")


# Parameter counts of HF CLIPVisionModel / SiglipVisionModel (with its attention-pooling head)
# built on the meta device from the same configs; tests/parity/test_hf_vision.py recomputes
# them from transformers. Published: CLIP ViT-L/14 vision ~303M, SigLIP So400m ~428M.
@pytest.mark.parametrize("preset,count", [
    (vit.CLIP_VIT_L14, 303_179_776),
    (vit.CLIP_VIT_L14_336, 303_507_456),
    (vit.SIGLIP_SO400M_14, 427_680_704),
    (vit.SIGLIP_SO400M_14_384, 428_225_600),
])
def test_big_presets_build_under_eval_shape_with_the_hf_parameter_counts(preset, count):
  model = vit.VisionTransformer(preset)
  size = preset.image_size
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x),
                                  jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
  assert out.shape == (2, preset.num_tokens, preset.width)
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(variables["params"]))) == count
