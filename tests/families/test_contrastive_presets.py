"""The `contrastive` presets at their published sizes: each one's parameter count under
``jax.eval_shape`` (nothing allocated) equals that of transformers' model built on torch's meta
device from the same config.json, and the figure open_clip publishes; and the importer,
fed that config.json, builds the preset."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.families.contrastive import convert, model
from mmjax.families.contrastive import presets as contrastive_presets

PUBLISHED = {name: figure for name, figure in contrastive_presets.PUBLISHED_PARAMETERS.items() if figure is not None}

# The fields of each model's config.json (sources in the presets' docstring); transformers'
# defaults fill the rest, in its config classes and in the importers alike.
_CLIP_L14 = dict(
    projection_dim=768, logit_scale_init_value=2.6592,
    text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                       patch_size=14, projection_dim=768))
PUBLISHED_CONFIGS = {
    "clip-vit-b-16": ("clip", dict(projection_dim=512, logit_scale_init_value=2.6592,
                                   text_config=dict(bos_token_id=0, eos_token_id=2),
                                   vision_config=dict(patch_size=16))),
    "clip-vit-l-14": ("clip", dict(_CLIP_L14, text_config=dict(_CLIP_L14["text_config"], bos_token_id=0,
                                                               eos_token_id=2))),
    "clip-vit-l-14-336": ("clip", dict(_CLIP_L14, vision_config=dict(_CLIP_L14["vision_config"], image_size=336))),
    "siglip-so400m-14-384": ("siglip", dict(
        text_config=dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27),
        vision_config=dict(hidden_size=1152, image_size=384, intermediate_size=4304, num_attention_heads=16,
                           num_hidden_layers=27, patch_size=14))),
    "siglip-b-16-224": ("siglip", dict(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, vocab_size=32000),
        vision_config=dict(patch_size=16))),
}


def published_range(figure: str) -> tuple[float, float]:
  """[low, high) of the counts a rounded figure in millions stands for: "149.62M" -> [149.615e6, 149.625e6)."""
  match = re.fullmatch(r"(\d+)(?:\.(\d+))?M", figure)
  if match is None:
    raise ValueError(f"published figure {figure!r}; expected an int or a string like '149.62M'")
  value = float(figure[:-1]) * 1e6
  half_unit = 0.5 * 10.0 ** -len(match.group(2) or "") * 1e6
  return value - half_unit, value + half_unit


def parameter_count(config: model.ContrastiveConfig) -> int:
  side = config.vision.image_size
  shapes = jax.eval_shape(model.ContrastiveModel(config).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, side, side, 3), jnp.uint8), jax.ShapeDtypeStruct((1, 8), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_a_rounded_figure_in_millions_stands_for_half_a_unit_of_its_last_digit_either_side():
  assert published_range("149.62M") == pytest.approx((149.615e6, 149.625e6))
  assert published_range("203M") == pytest.approx((202.5e6, 203.5e6))
  with pytest.raises(ValueError, match="expected an int or a string"):
    published_range("about 0.4B")


def test_every_published_preset_has_its_config_json_here():
  assert set(PUBLISHED) == set(PUBLISHED_CONFIGS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_contrastive_presets_have_their_published_parameter_counts(name):
  count, figure = parameter_count(contrastive_presets.presets()[name]), PUBLISHED[name]
  if isinstance(figure, int):
    assert count == figure
  else:
    low, high = published_range(figure)
    assert low <= count < high, f"{name}: {count:,} parameters, published {figure}"


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_the_importer_builds_each_published_preset_from_its_config_json(name):
  kind, fields = PUBLISHED_CONFIGS[name]
  to_config = convert.config_from_hf_clip if kind == "clip" else convert.config_from_hf_siglip
  config = to_config(dict(fields, model_type=kind))
  if kind == "clip" and fields["text_config"].get("eos_token_id") == 2:
    # OpenAI's legacy eos_token_id=2 pools the highest id, which is <|endoftext|> = 49407, the
    # id the preset names: the same position of every text CLIP's tokenizer makes.
    assert config.text.eos_token_id is None
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, eos_token_id=49407))
  assert config == contrastive_presets.presets()[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_each_published_preset_counts_as_many_parameters_as_the_hf_model(name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  kind, fields = PUBLISHED_CONFIGS[name]
  model_class, config_class = ((transformers.CLIPModel, transformers.CLIPConfig) if kind == "clip"
                               else (transformers.SiglipModel, transformers.SiglipConfig))
  with torch.device("meta"):  # shapes only: nothing allocated
    hf_model = model_class(config_class(**fields))
  hf_count = sum(p.numel() for p in hf_model.parameters())
  assert parameter_count(contrastive_presets.presets()[name]) == hf_count
