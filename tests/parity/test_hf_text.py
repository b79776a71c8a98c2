"""Parity of TextTower with transformers' CLIP and SigLIP text towers after importing their
state_dicts: pooled (projected) embeddings and token states on padded batches, plus the
converter's key handling (prefixes, config readers, one error listing every bad key).

Reference models are tiny, random (torch.manual_seed) and built from local configs; every
parameter is perturbed so LayerNorm scales and biases are not the trivial 1 and 0.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax.convert import hf_text
from mmjax.models import text_tower
from tests.parity.conftest import seed_torch, state_dict_to_numpy, to_numpy

pytestmark = pytest.mark.parity

TOL = 1e-4
BOS, EOS, PAD = 97, 98, 0

CLIP_TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, projection_dim=24, bos_token_id=BOS, eos_token_id=EOS,
                 pad_token_id=PAD)
SIGLIP_TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=12, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, projection_size=20, pad_token_id=1, eos_token_id=EOS)
VISION_TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   image_size=8, patch_size=4)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _build(model_cls, config):
  seed_torch(0)
  return _perturb(model_cls(config))


def _clip_batch(pad: int, length: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Two texts as the CLIP tokenizer gives them with padding=True: BOS ... EOS, the shorter one
  padded on the right with ``pad`` and masked."""
  rng = np.random.default_rng(1)
  ids = np.full((2, length), pad, np.int64)
  mask = np.zeros((2, length), np.int64)
  for row, n in enumerate((length, 7)):
    ids[row, :n] = [BOS, *rng.integers(3, 90, n - 2), EOS]
    mask[row, :n] = 1
  return ids, mask


def _siglip_batch(length: int = 12, pad: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Two texts padded to the fixed length (SigLIP's padding='max_length'), EOS-terminated."""
  rng = np.random.default_rng(2)
  ids = np.full((2, length), pad, np.int64)
  mask = np.zeros((2, length), np.int64)
  for row, n in enumerate((length, 5)):
    ids[row, :n] = [*rng.integers(3, 90, n - 1), EOS]
    mask[row, :n] = 1
  return ids, mask


@functools.cache
def _features_fn(config: text_tower.TextTowerConfig):
  model = text_tower.TextTower(config)
  return jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask, method=text_tower.TextTower.features))


def _ours(config, params, ids, mask=None) -> dict:
  return _features_fn(config)(params, jnp.asarray(ids, jnp.int32), None if mask is None else jnp.asarray(mask))


def _torch(ids, mask=None) -> dict:
  out = dict(input_ids=torch.from_numpy(ids))
  if mask is not None:
    out["attention_mask"] = torch.from_numpy(mask)
  return out


def _maxdiff(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _pooled(features) -> np.ndarray:
  """get_text_features returns a tensor (transformers 4) or an output with the projected pooler."""
  return to_numpy(features if isinstance(features, torch.Tensor) else features.pooler_output)


@pytest.fixture(scope="module")
def clip_with_projection():
  return _build(transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig(**CLIP_TINY))


@pytest.fixture(scope="module")
def siglip():
  return _build(transformers.SiglipTextModel, transformers.SiglipTextConfig(**SIGLIP_TINY))


def test_clip_text_with_projection_matches_hf_on_a_padded_masked_batch(clip_with_projection):
  model = clip_with_projection
  config = hf_text.config_from_hf_clip_text(model.config)
  assert config.eos_token_id == EOS and config.causal and config.projection_dim == 24
  params = hf_text.clip_text_from_state_dict(state_dict_to_numpy(model), config)
  ids, mask = _clip_batch(pad=PAD)
  with torch.no_grad():
    ref = model(**_torch(ids, mask))
  ours = _ours(config, params, ids, mask)
  assert _maxdiff(ours["pooled"], to_numpy(ref.text_embeds)) <= TOL
  # Padded positions too: HF hides padded keys besides the causal mask, and so do we.
  assert _maxdiff(ours["tokens"], to_numpy(ref.last_hidden_state)) <= TOL


def test_clip_pools_the_first_eos_when_the_pad_id_is_the_eos_id(clip_with_projection):
  # OpenAI's tokenizer pads with <|endoftext|> itself: the first one must be pooled.
  model = clip_with_projection
  config = hf_text.config_from_hf_clip_text(model.config)
  params = hf_text.clip_text_from_state_dict(state_dict_to_numpy(model), config)
  ids, mask = _clip_batch(pad=EOS)
  with torch.no_grad():
    ref = to_numpy(model(**_torch(ids, mask)).text_embeds)
  assert _maxdiff(_ours(config, params, ids, mask)["pooled"], ref) <= TOL
  unmasked = _ours(config, params, ids)["pooled"]  # the pooled state comes before any pad: same
  assert _maxdiff(unmasked, ref) <= TOL


def test_clip_model_get_text_features_with_legacy_eos_id_2_pools_the_highest_id():
  text = dict(CLIP_TINY, eos_token_id=2)
  hf_config = transformers.CLIPConfig(text_config=text, vision_config=VISION_TINY, projection_dim=12)
  model = _build(transformers.CLIPModel, hf_config)
  config = hf_text.config_from_hf_clip_text(hf_config.to_dict())  # the config.json dict
  assert config.eos_token_id is None and config.projection_dim == 12
  params = hf_text.clip_text_from_state_dict(state_dict_to_numpy(model), config)
  ids, mask = _clip_batch(pad=EOS)  # EOS = 98 is the highest id, as <|endoftext|> in OpenAI's vocabulary
  with torch.no_grad():
    ref = _pooled(model.get_text_features(**_torch(ids, mask)))
  assert _maxdiff(_ours(config, params, ids, mask)["pooled"], ref) <= TOL


def test_siglip_text_matches_hf_without_a_mask_pooling_the_last_padded_position(siglip):
  config = hf_text.config_from_hf_siglip_text(siglip.config)
  assert not config.causal and config.pooling == "last" and config.projection_dim == 20
  params = hf_text.siglip_text_from_state_dict(state_dict_to_numpy(siglip), config)
  ids, _ = _siglip_batch()
  with torch.no_grad():
    ref = siglip(**_torch(ids))
  ours = _ours(config, params, ids)
  assert _maxdiff(ours["pooled"], to_numpy(ref.pooler_output)) <= TOL
  assert _maxdiff(ours["tokens"], to_numpy(ref.last_hidden_state)) <= TOL


def test_siglip_text_with_a_mask_hides_padded_keys_as_hf(siglip):
  config = hf_text.config_from_hf_siglip_text(siglip.config.to_dict())
  params = hf_text.siglip_text_from_state_dict(state_dict_to_numpy(siglip), config)
  ids, mask = _siglip_batch()
  with torch.no_grad():
    ref = siglip(**_torch(ids, mask))
  ours = _ours(config, params, ids, mask)
  assert _maxdiff(ours["pooled"], to_numpy(ref.pooler_output)) <= TOL
  assert _maxdiff(ours["tokens"], to_numpy(ref.last_hidden_state)) <= TOL
  # The mask matters for the shorter text (its pooled position is a pad), not the full one.
  unmasked = _ours(config, params, ids)["pooled"]
  assert _maxdiff(unmasked[0], ours["pooled"][0]) <= TOL
  assert _maxdiff(unmasked[1], ours["pooled"][1]) > 1e-3


def test_siglip_model_get_text_features_matches_after_import_of_the_whole_state_dict():
  hf_config = transformers.SiglipConfig(text_config=SIGLIP_TINY, vision_config=VISION_TINY)
  model = _build(transformers.SiglipModel, hf_config)
  config = hf_text.config_from_hf_siglip_text(hf_config.to_dict())
  params = hf_text.siglip_text_from_state_dict(state_dict_to_numpy(model), config)
  ids, _ = _siglip_batch()
  with torch.no_grad():
    ref = _pooled(model.get_text_features(**_torch(ids)))
  assert _maxdiff(_ours(config, params, ids)["pooled"], ref) <= TOL


def test_converted_tree_has_the_structure_and_shapes_of_init(clip_with_projection, siglip):
  for model, to_config, convert in (
      (clip_with_projection, hf_text.config_from_hf_clip_text, hf_text.clip_text_from_state_dict),
      (siglip, hf_text.config_from_hf_siglip_text, hf_text.siglip_text_from_state_dict)):
    config = to_config(model.config)
    init = jax.eval_shape(text_tower.TextTower(config).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 4), jnp.int32))
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(init["params"]))
    got = jax.tree.map(lambda x: (x.shape, x.dtype), convert(state_dict_to_numpy(model), config))
    assert got == expected


def test_a_prefix_reads_the_tower_inside_a_larger_state_dict(clip_with_projection):
  model = clip_with_projection
  config = hf_text.config_from_hf_clip_text(model.config)
  direct = hf_text.clip_text_from_state_dict(state_dict_to_numpy(model), config)
  sd = {f"encoder.clip.{k}": v for k, v in state_dict_to_numpy(model).items()}
  sd["encoder.clip.vision_model.embeddings.class_embedding"] = np.zeros(16, np.float32)
  sd["decoder.weight"] = np.zeros(3, np.float32)
  got = hf_text.clip_text_from_state_dict(sd, config, prefix="encoder.clip.")
  jax.tree.map(np.testing.assert_array_equal, got, direct)
  # A bare CLIPTextModel (no text_model. level, no projection) is read with projection_dim=None.
  bare = {k[len("text_model."):]: v for k, v in state_dict_to_numpy(model).items() if k.startswith("text_model.")}
  no_proj = hf_text.clip_text_from_state_dict(bare, dataclasses.replace(config, projection_dim=None))
  assert "projection" not in no_proj


def test_missing_unexpected_and_misshaped_keys_are_listed_in_one_error(siglip):
  config = hf_text.config_from_hf_siglip_text(siglip.config)
  sd = state_dict_to_numpy(siglip)
  p = hf_text.resolve_prefix(sd, None)
  del sd[f"{p}encoder.layers.1.mlp.fc1.bias"]
  sd[f"{p}encoder.layers.5.mlp.fc1.bias"] = np.zeros(48, np.float32)
  sd[f"{p}head.weight"] = np.zeros((20, 31), np.float32)
  with pytest.raises(ValueError) as err:
    hf_text.siglip_text_from_state_dict(sd, config)
  message = str(err.value)
  assert f"{p}encoder.layers.1.mlp.fc1.bias" in message
  assert f"{p}encoder.layers.5.mlp.fc1.bias" in message
  assert f"{p}head.weight: shape (20, 31), expected (20, 32)" in message
