"""The `llava` presets: the published ones count, under ``jax.eval_shape`` (nothing
allocated), the parameters of transformers' model built on torch's meta device from the same
config.json, and the figure the presets publish; the importer, fed that config.json, builds
the preset; the tiny one holds exactly the trees of the clip/tiny tower and the lm/tiny LM it
starts from; overrides reach the parts they name."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.families.contrastive import model as contrastive_model
from mmjax.families.contrastive import presets as contrastive_presets
from mmjax.families.llava import convert, model
from mmjax.families.llava import presets as llava_presets
from mmjax.families.lm import model as lm_model
from mmjax.families.lm import presets as lm_presets

PUBLISHED = {name: n for name, n in llava_presets.PUBLISHED_PARAMETERS.items() if n is not None}

# The fields of each model's config.json (sources in the presets' docstring); transformers'
# defaults fill the rest, in its config classes and in the importer alike.
_CLIP_L14_336 = dict(model_type="clip_vision_model", hidden_size=1024, image_size=336, intermediate_size=4096,
                     num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768, vocab_size=32000)
_LLAVA = dict(image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
              vision_feature_select_strategy="default", tie_word_embeddings=False, vision_config=_CLIP_L14_336)
_VICUNA_7B = dict(model_type="llama", architectures=["LlamaForCausalLM"], max_position_embeddings=4096,
                  rms_norm_eps=1e-5, vocab_size=32064)
_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PUBLISHED_CONFIGS = {
    "llava-1.5-7b": dict(_LLAVA, model_type="llava", architectures=["LlavaForConditionalGeneration"],
                         pad_token_id=32001, text_config=_VICUNA_7B),
    "llava-1.5-13b": dict(_LLAVA, model_type="llava", architectures=["LlavaForConditionalGeneration"],
                          pad_token_id=32001, text_config=dict(
                              _VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                              num_hidden_layers=40)),
    "llava-v1.6-mistral-7b": dict(
        _LLAVA, model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
        image_grid_pinpoints=_PINPOINTS, use_image_newline_parameter=True,
        text_config=dict(model_type="mistral", architectures=["MistralForCausalLM"], intermediate_size=14336,
                         max_position_embeddings=32768, num_key_value_heads=8, rms_norm_eps=1e-5,
                         rope_theta=1000000.0, sliding_window=None, vocab_size=32064)),
    "llava-v1.6-vicuna-7b": dict(
        _LLAVA, model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
        image_grid_pinpoints=_PINPOINTS, pad_token_id=32001, use_image_newline_parameter=True,
        text_config=_VICUNA_7B),
}


def parameter_shapes(config: model.LlavaConfig):
  side = config.vision.image_size
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  images = jax.ShapeDtypeStruct((1, 1, side, side, 3), jnp.uint8)
  return nn.unbox(jax.eval_shape(model.Llava(config).init, jax.random.key(0), images, ids, ids))["params"]


def parameter_count(config: model.LlavaConfig) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(parameter_shapes(config)))


def shapes_of(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), x.dtype), tree)


def test_every_published_preset_has_its_config_json_here():
  assert set(PUBLISHED) == set(PUBLISHED_CONFIGS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_llava_presets_have_their_published_parameter_counts(name):
  assert parameter_count(llava_presets.presets()[name]) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_the_importer_builds_each_published_preset_from_its_config_json(name):
  assert convert.llava_config_from_hf(PUBLISHED_CONFIGS[name]) == llava_presets.presets()[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_each_published_preset_counts_as_many_parameters_as_the_hf_model(name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  fields = PUBLISHED_CONFIGS[name]
  model_class, config_class = ((transformers.LlavaForConditionalGeneration, transformers.LlavaConfig)
                               if fields["model_type"] == "llava" else
                               (transformers.LlavaNextForConditionalGeneration, transformers.LlavaNextConfig))
  with torch.device("meta"):  # shapes only: nothing allocated
    hf_model = model_class(config_class(**fields))
  hf_count = sum(p.numel() for p in hf_model.parameters())
  assert hf_count == PUBLISHED[name]


def test_llava_tiny_holds_the_clip_tiny_tower_and_the_lm_tiny_decoder_trees():
  tiny = llava_presets.presets()["llava-tiny"]
  clip = contrastive_presets.presets()["clip-tiny"]
  side = clip.vision.image_size
  clip_shapes = jax.eval_shape(contrastive_model.ContrastiveModel(clip).init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, side, side, 3), jnp.uint8),
                               jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]
  clip_shapes = nn.unbox(clip_shapes)
  lm = lm_presets.presets()["lm-tiny"]
  lm_shapes = jax.eval_shape(lm_model.LanguageModel(lm).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]
  lm_shapes = nn.unbox(lm_shapes)
  ours = parameter_shapes(tiny)
  assert shapes_of(ours["vision"]) == shapes_of(clip_shapes["vision"])
  assert shapes_of(ours["decoder"]) == shapes_of(lm_shapes["decoder"])
  # 64 px with 8 px patches, the CLS dropped: 64 tokens per image, projected to the LM's 128.
  assert tiny.tokens_per_slot == 64
  assert ours["projector"]["linear_1"]["kernel"].shape == (64, 128)


def test_overrides_reach_the_decoder_and_both_parts_and_refuse_unknown_names():
  tiny = llava_presets.presets()["llava-tiny"]
  config = llava_presets.override(tiny, vocab_size=300, scan_layers=True, dtype="bfloat16", image_token_id=299)
  assert (config.decoder.vocab_size, config.decoder.scan_layers, config.image_token_id) == (300, True, 299)
  assert config.vision.dtype == config.decoder.dtype == "bfloat16"
  assert config.vision == dataclasses.replace(tiny.vision, dtype="bfloat16")
  with pytest.raises(ValueError, match=r"unknown overrides \['image_size'\]"):
    llava_presets.override(tiny, image_size=336)
  with pytest.raises(ValueError, match=r"image_token_id=1024 is outside the vocabulary \[0, 1024\)"):
    llava_presets.override(tiny, image_token_id=1024)
