"""The `blip2` presets: the published ones count, under ``jax.eval_shape`` (nothing
allocated), the parameters of transformers' model built on torch's meta device from the same
config.json (MiniGPT-4, which transformers lacks: the sum of its parts built so), and the
figure the presets publish; the importer, fed that config.json, builds the preset; the tiny
ones hold exactly the trees of the clip/tiny tower and the lm/tiny LM they start from, and
stage 2's Q-Former is stage 1's without its text parts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import zoo
from mmjax.families.blip2 import convert, model
from mmjax.families.blip2 import presets as blip2_presets
from mmjax.families.contrastive import model as contrastive_model
from mmjax.families.lm import model as lm_model

PUBLISHED = {name: n for name, n in blip2_presets.PUBLISHED_PARAMETERS.items() if n is not None}

# The fields of each model's config.json (sources in the presets' docstring); transformers'
# defaults fill the rest, in its config classes and in the importer alike.
_BLIP2 = dict(model_type="blip-2", architectures=["Blip2ForConditionalGeneration"], image_text_hidden_size=256,
              num_query_tokens=32, qformer_config=dict(model_type="blip_2_qformer"),
              vision_config=dict(model_type="blip_2_vision_model", num_channels=3, dropout=0.0))
_OPT = dict(model_type="opt", architectures=["OPTForCausalLM"], eos_token_id=50118, num_attention_heads=32,
            num_hidden_layers=32, vocab_size=50304)
_LLAMA_7B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
                 num_attention_heads=32, num_hidden_layers=32, max_position_embeddings=2048, rms_norm_eps=1e-6)
PUBLISHED_CONFIGS = {
    "blip2-opt-2.7b": dict(_BLIP2, image_token_index=50265, text_config=dict(
        _OPT, ffn_dim=10240, hidden_size=2560, word_embed_proj_dim=2560)),
    "blip2-opt-6.7b": dict(_BLIP2, image_token_index=50265, text_config=dict(
        _OPT, ffn_dim=16384, hidden_size=4096, word_embed_proj_dim=4096)),
    "instructblip-vicuna-7b": dict(
        model_type="instructblip", architectures=["InstructBlipForConditionalGeneration"], num_query_tokens=32,
        image_token_index=32001, qformer_config=dict(model_type="instructblip_qformer", vocab_size=30523),
        vision_config=dict(model_type="instructblip_vision_model"), text_config=dict(_LLAMA_7B, vocab_size=32064)),
    # MiniGPT-4 as a Blip2ForConditionalGeneration with its LM (transformers has no MiniGPT-4).
    "minigpt4-vicuna-7b": dict(_BLIP2, image_token_index=32000, text_config=dict(_LLAMA_7B, vocab_size=32001)),
}


def parameter_shapes(config: model.Blip2Config):
  side = config.vision.image_size
  images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.uint8)
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  blip2 = model.Blip2(config)
  if config.decoder is None:
    init = lambda key, *args: blip2.init(key, *args, method=model.Blip2.initialize)  # noqa: E731
    return nn.unbox(jax.eval_shape(init, jax.random.key(0), images, ids, ids))["params"]
  extra = (ids, ids) if config.instruction else ()
  return nn.unbox(jax.eval_shape(blip2.init, jax.random.key(0), images, ids, *extra))["params"]


def parameter_count(config: model.Blip2Config) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(parameter_shapes(config)))


def shapes_of(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), x.dtype), tree)


def test_every_published_preset_has_its_config_json_here():
  assert set(PUBLISHED) == set(PUBLISHED_CONFIGS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_blip2_presets_have_their_published_parameter_counts(name):
  count = parameter_count(blip2_presets.presets()[name])
  print(f"{name}: {count:,} parameters under eval_shape")
  assert count == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_the_importer_builds_each_published_preset_from_its_config_json(name):
  assert convert.blip2_config_from_hf(PUBLISHED_CONFIGS[name]) == blip2_presets.presets()[name]


def _meta_count(module) -> int:
  return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_each_published_preset_counts_as_many_parameters_as_the_hf_model(name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  fields = PUBLISHED_CONFIGS[name]
  classes = {"blip-2": (transformers.Blip2ForConditionalGeneration, transformers.Blip2Config),
             "instructblip": (transformers.InstructBlipForConditionalGeneration, transformers.InstructBlipConfig)}
  model_class, config_class = classes[fields["model_type"]]
  with torch.device("meta"):  # shapes only: nothing allocated
    hf_count = _meta_count(model_class(config_class(**fields)))
  print(f"{name}: {hf_count:,} parameters in transformers")
  assert hf_count == PUBLISHED[name]


def test_minigpt4_counts_the_sum_of_its_published_parts():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  with torch.device("meta"):
    parts = {"EVA ViT-g/14 (BLIP-2's, with ln_vision)": _meta_count(transformers.Blip2VisionModel(
                 transformers.Blip2VisionConfig())),
             "Q-Former (BLIP-2's, without text input)": _meta_count(transformers.Blip2QFormerModel(
                 transformers.Blip2QFormerConfig())),
             "query tokens": 32 * 768,
             "llama_proj": _meta_count(torch.nn.Linear(768, 4096)),
             "Vicuna-7B v0": _meta_count(transformers.LlamaForCausalLM(transformers.LlamaConfig(
                 **{k: v for k, v in PUBLISHED_CONFIGS["minigpt4-vicuna-7b"]["text_config"].items()
                    if k not in ("model_type", "architectures")})))}
  print({k: f"{v:,}" for k, v in parts.items()})
  assert sum(parts.values()) == PUBLISHED["minigpt4-vicuna-7b"]


def test_the_tiny_presets_hold_the_clip_tiny_tower_and_the_lm_tiny_decoder_trees():
  stage1, stage2 = (blip2_presets.presets()[name] for name in ("blip2-tiny", "blip2-tiny-stage2"))
  clip, lm = zoo.get("clip-tiny"), zoo.get("lm-tiny")
  assert stage1.vision == stage2.vision == clip.vision and stage2.decoder == lm.decoder
  side = clip.vision.image_size
  clip_shapes = nn.unbox(jax.eval_shape(contrastive_model.ContrastiveModel(clip).init, jax.random.key(0),
                                        jax.ShapeDtypeStruct((1, side, side, 3), jnp.uint8),
                                        jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"])
  lm_shapes = nn.unbox(jax.eval_shape(lm_model.LanguageModel(lm).init, jax.random.key(0),
                                      jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"])
  first, second = parameter_shapes(stage1), parameter_shapes(stage2)
  assert shapes_of(first["vision"]) == shapes_of(second["vision"]) == shapes_of(clip_shapes["vision"])
  assert shapes_of(second["decoder"]) == shapes_of(lm_shapes["decoder"])
  # Stage 2's Q-Former is stage 1's without the text embeddings and text feed-forwards.
  flat = lambda tree: {jax.tree_util.keystr(k): (v.shape, v.dtype)  # noqa: E731
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  q1, q2 = flat(first["qformer"]), flat(second["qformer"])
  assert {k: q1[k] for k in q2} == q2
  text_parts = ("['word_embeddings']", "['position_embeddings']", "['ffn_text']")
  assert {part for k in set(q1) - set(q2) for part in text_parts if part in k} == set(text_parts)
  assert all(any(part in k for part in text_parts) for k in set(q1) - set(q2))
  assert first["query_tokens"].shape == (8, 64) and second["language_projection"]["kernel"].shape == (64, 128)
  assert set(first) - set(second) == {"vision_projection", "text_projection", "temperature", "itm_head",
                                      "itg_transform", "itg_layernorm", "itg_bias"}
  print(f"blip2-tiny: {parameter_count(stage1):,} parameters; blip2-tiny-stage2: {parameter_count(stage2):,}")
