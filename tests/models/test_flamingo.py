"""Flamingo: every zoo preset builds under jax.eval_shape with the expected parameter counts,
parameters are labelled by component, images are normalised inside, bad inputs raise."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import zoo
from mmjax.families.flamingo.model import Flamingo, param_labels
from tests.infer.util import micro_config, random_params

# name -> (total, share labelled 'xattn') from counting the published architectures by
# hand (ViT-L/14 303M; OpenFlamingo resampler 63M; MPT-1B 1.311B, RedPajama-INCITE-3B 2.775B,
# MPT-7B 6.649B, each with 50280 vocabulary rows; 24 / 16 / 8 xattn blocks of 36.7M / 56.1M /
# 139.5M; Chinchilla-like 80-layer LM, 11 blocks of 696M).
EXPECTED = {
    "flamingo-tiny": (1.10e6, None),
    "openflamingo-3b": (2.558e9, 0.881e9),
    "openflamingo-4b": (4.039e9, 0.898e9),
    "openflamingo-9b": (8.131e9, 1.116e9),
    "flamingo-80b": (73.3e9, 7.66e9),
}


def _abstract_params(config):
  v = config.vision
  shapes = jax.eval_shape(
      Flamingo(config).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 1, v.image_size, v.image_size, 3), jnp.uint8),
      jax.ShapeDtypeStruct((1, 4), jnp.int32))
  return shapes["params"]


def _count_by_label(params):
  params = nn.unbox(params)
  counts = {}
  for label, leaf in zip(jax.tree.leaves(param_labels(params)), jax.tree.leaves(params)):
    counts[label] = counts.get(label, 0) + int(np.prod(leaf.shape))
  return counts


@pytest.mark.parametrize("name", zoo.list("flamingo"))
def test_every_preset_builds_under_eval_shape_with_its_parameter_count(name):
  config = zoo.get(name)
  params = _abstract_params(config)
  counts = _count_by_label(params)
  total, xattn = EXPECTED[name]
  assert sum(counts.values()) == pytest.approx(total, rel=0.01)
  if xattn is not None:
    assert counts["xattn"] == pytest.approx(xattn, rel=0.01)
  assert set(counts) == {"vision", "resampler", "xattn", "lm"}
  # The boxes the trainer shards by are kept in what init returns.
  assert any(isinstance(x, nn.Partitioned) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))


def test_param_labels_name_each_component_by_its_place_in_the_tree():
  params = nn.unbox(_abstract_params(zoo.get("flamingo-tiny")))
  labels = param_labels(params)
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  for path, label in flat:
    keys = [p.key for p in path]
    want = ("vision" if keys[0] == "vision" else "resampler" if keys[0] == "resampler"
            else "xattn" if any(k.startswith("xattn_") for k in keys) else "lm")
    assert label == want, keys
  assert labels["decoder"]["xattn_1"]["attn_gate"] == "xattn"
  assert labels["decoder"]["layers_1"]["attn"]["query"]["kernel"] == "lm"
  assert labels["decoder"]["embed"]["embedding"] == "lm"
  # The same labels with the 'params' level kept and the partitioning boxes on.
  boxed = param_labels({"params": _abstract_params(zoo.get("flamingo-tiny"))})
  assert jax.tree.leaves(boxed) == jax.tree.leaves(labels)


def test_zoo_overrides_vocab_and_special_token_ids():
  config = zoo.get("flamingo-tiny", vocab_size=500, media_token_id=7, end_of_chunk_token_id=8)
  assert (config.decoder.vocab_size, config.media_token_id, config.end_of_chunk_token_id) == (500, 7, 8)
  with pytest.raises(ValueError, match="unknown preset 'flamingo-7b'"):
    zoo.get("flamingo-7b")
  with pytest.raises(ValueError, match="media_token_id=600 is outside the vocabulary"):
    zoo.get("flamingo-tiny", vocab_size=500, media_token_id=600)
  with pytest.raises(ValueError, match="unknown overrides"):
    zoo.get("flamingo-tiny", width=3)


CONFIG = micro_config()
MEDIA = CONFIG.media_token_id


@pytest.fixture(scope="module")
def params():
  return random_params(CONFIG)


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 2, 16, 16, 3)).astype(np.uint8)
  ids = rng.integers(6, 64, (2, 7)).astype(np.int32)
  ids[:, [1, 4]] = MEDIA
  return images, ids


def test_uint8_images_and_the_same_images_as_floats_in_0_1_give_the_same_logits(params):
  images, ids = _inputs()
  apply = jax.jit(Flamingo(CONFIG).apply)
  a = apply(params, images, ids)
  b = apply(params, images.astype(np.float32) / 255.0, ids)
  assert a.dtype == jnp.float32 and a.shape == (2, 7, 64)
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda im, ids: (im[:, :1], ids), "example 0 has 1 images but 2 <image> tokens"),
    (lambda im, ids: (im[:, 0], ids), r"images has shape \(2, 16, 16, 3\); expected rank 5"),
    (lambda im, ids: (im.astype(np.int32), ids), "images has dtype int32; expected uint8 or a float"),
    (lambda im, ids: (im, np.where(ids == 9, 64, ids)), r"token id 64 at \(\d, \d\) is outside the vocabulary \[0, 64\)"),
    (lambda im, ids: (im, np.where(ids == MEDIA, MEDIA, -1)), r"token id -1 .* outside the vocabulary"),
    (lambda im, ids: (im, np.tile(ids, (1, 10))), "sequence length 70 exceeds the configured maximum 64"),
    (lambda im, ids: (im, ids.astype(np.float32)), "input_ids has dtype float32; expected an integer"),
])
def test_bad_inputs_raise_a_value_error_naming_the_value_and_what_was_expected(params, change, message):
  images, ids = _inputs()
  ids[0, 3] = 9
  images, ids = change(images, ids)
  with pytest.raises(ValueError, match=message):
    Flamingo(CONFIG).apply(params, images, ids)


def test_image_mask_lets_examples_hold_fewer_images_than_the_padded_count(params):
  images, ids = _inputs()
  ids[1, 4] = 7  # example 1 now has one <image>
  mask = np.array([[True, True], [True, False]])
  logits = jax.jit(Flamingo(CONFIG).apply)(params, images, ids, image_mask=mask)
  assert np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match="example 1 has 2 images but 1 <image> tokens"):
    Flamingo(CONFIG).apply(params, images, ids)
