"""The `llava` family's presets: LLaVA-1.5 and LLaVA-NeXT (v1.6) at their published sizes, and
a CPU-sized one.

- ``llava-tiny``: the image tower of ``clip-tiny`` (64 px, convolutional stem, width 64, 2
  layers: 64 tokens per image once the CLS is dropped) and the LM of ``lm-tiny`` (width 128,
  4 layers, vocabulary 1024), so a LLaVA run can start from a ``configs/clip/tiny.py``
  tower and a ``configs/lm/tiny.py`` LM, as LLaVA starts from CLIP and Vicuna. The projector
  reads the tower's penultimate hidden state (here the first block's output), as LLaVA-1.5
  does. ``image_token_id`` 4 is the tiny sentencepiece vocabulary's ``<image>`` (the id
  ``flamingo-tiny`` names); the task sets it, and ``vocab_size``, from the tokenizer in use.

Published models, each exactly what ``convert.llava_config_from_hf`` builds from its Hugging
Face config.json (fields a config.json omits take transformers' defaults), so
``convert.llava_from_hf_directory`` fills it. All four share OpenAI CLIP ViT-L/14 at 336 px
(vision_config: hidden_size 1024, 24 layers, 16 heads, intermediate 4096, patch 14, image
336; 303,507,456 parameters with its unused post_layernorm, which the checkpoints hold), its
penultimate hidden state (vision_feature_layer -2) without the CLS token
(vision_feature_select_strategy "default": 576 tokens per 336 px slot), and the mlp2x_gelu
projector (projector_hidden_act "gelu", with biases). The count after each is Hugging Face's,
the model built on torch's meta device from that config.json
(tests/families/test_llava_presets.py), which is also the checkpoint's own total; the
figure in brackets is the rounded one the model card's page shows.

- ``llava-1.5-7b``: huggingface.co/llava-hf/llava-1.5-7b-hf config.json (Liu et al. 2023,
  "Improved Baselines with Visual Instruction Tuning"): text_config Vicuna-7B v1.5 (LLaMA-2-7B
  shapes: 4096 wide, 32 layers, 32 heads, SwiGLU 11008, rms_norm_eps 1e-5,
  max_position_embeddings 4096) with vocab_size 32064 (Vicuna's 32000, ``<image>`` = 32000,
  ``<pad>`` = 32001, padded to a multiple of 64); image_token_index 32000; 7,063,427,072
  parameters [7.06B].
- ``llava-1.5-13b``: llava-hf/llava-1.5-13b-hf config.json: Vicuna-13B v1.5 (LLaMA-2-13B
  shapes: 5120 wide, 40 layers, 40 heads, SwiGLU 13824, rms_norm_eps 1e-5, 4096 positions),
  vocab_size 32064; 13,351,494,656 parameters [13.4B].
- ``llava-v1.6-mistral-7b``: llava-hf/llava-v1.6-mistral-7b-hf config.json (Liu et al. 2024,
  "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge"): text_config
  Mistral-7B-Instruct-v0.2 (4096 wide, 32 layers, 32 heads with 8 key/value heads, SwiGLU
  14336, rms_norm_eps 1e-5, rope_theta 1e6, sliding_window null, 32768 positions),
  vocab_size 32064; image_grid_pinpoints [[336, 672], [672, 336], [672, 672], [1008, 336],
  [336, 1008]] and the learned image_newline; 7,566,747,648 parameters [7.57B].
- ``llava-v1.6-vicuna-7b``: llava-hf/llava-v1.6-vicuna-7b-hf config.json: LLaVA-1.5-7B's LM
  and tower with the same five pinpoints and image_newline; 7,063,431,168 parameters
  [7.06B].

Overrides (``mmjax.zoo.get(name, **overrides)``): ``vocab_size``, ``max_length``, ``remat``,
``scan_layers`` (the decoder's); ``dtype``, ``attention_backend`` (tower and decoder); any
other ``LlavaConfig`` field (``image_token_id``, ``vision``, ``decoder``, ...) replaced whole.
"""

from __future__ import annotations

import dataclasses

from mmjax.families.contrastive import presets as contrastive_presets
from mmjax.families.llava.model import LlavaConfig
from mmjax.families.lm import presets as lm_presets
from mmjax.models.decoder import DecoderConfig
from mmjax.models.vit import CLIP_VIT_L14_336

# LLaVA-v1.6's grid resolutions, (height, width) (transformers' LlavaNextConfig default too).
LLAVA_V16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

# Vicuna-7B v1.5 with LLaVA's 32064-row vocabulary.
_VICUNA_7B = dataclasses.replace(lm_presets.presets()["vicuna-7b-v1.5"].decoder, vocab_size=32064)
_VICUNA_13B = DecoderConfig(
    vocab_size=32064, width=5120, depth=40, num_heads=40, num_kv_heads=40, head_dim=128, mlp_dim=13824,
    max_length=4096, norm_eps=1e-5)
# Mistral-7B-Instruct-v0.2: Mistral-7B-v0.1's shapes, rope_theta 1e6, no sliding window.
_MISTRAL_7B_INSTRUCT_V02 = dataclasses.replace(
    lm_presets.presets()["mistral-7b"].decoder, vocab_size=32064, rope_theta=1_000_000.0, sliding_window=0)

_LLAVA_15 = dict(vision=CLIP_VIT_L14_336, vision_feature_layers=(-2,), select_strategy="default",
                 projector="mlp2x", projector_activation="gelu", projector_bias=True, image_token_id=32000)
_LLAVA_16 = dict(_LLAVA_15, image_newline=True, grid_pinpoints=LLAVA_V16_PINPOINTS)

_PRESETS: dict[str, LlavaConfig] = {
    "llava-tiny": LlavaConfig(
        vision=contrastive_presets.presets()["clip-tiny"].vision,
        decoder=lm_presets.presets()["lm-tiny"].decoder,
        vision_feature_layers=(-2,), select_strategy="default", projector="mlp2x", projector_activation="gelu",
        projector_bias=True, image_token_id=4),
    "llava-1.5-7b": LlavaConfig(decoder=_VICUNA_7B, **_LLAVA_15),
    "llava-1.5-13b": LlavaConfig(decoder=_VICUNA_13B, **_LLAVA_15),
    "llava-v1.6-mistral-7b": LlavaConfig(decoder=_MISTRAL_7B_INSTRUCT_V02, **_LLAVA_16),
    "llava-v1.6-vicuna-7b": LlavaConfig(decoder=_VICUNA_7B, **_LLAVA_16),
}

# The counts the sources give (module docstring), for the docs' tables; a test checks each
# against the preset's jax.eval_shape count and transformers' meta-device count.
PUBLISHED_PARAMETERS: dict[str, int | None] = {
    "llava-tiny": None,
    "llava-1.5-7b": 7_063_427_072,
    "llava-1.5-13b": 13_351_494_656,
    "llava-v1.6-mistral-7b": 7_566_747_648,
    "llava-v1.6-vicuna-7b": 7_063_431_168,
}

_DECODER_OVERRIDES = ("vocab_size", "max_length", "remat", "scan_layers")
_EVERYWHERE_OVERRIDES = ("dtype", "attention_backend")


def presets() -> dict[str, LlavaConfig]:
  """The presets by name."""
  return dict(_PRESETS)


def override(config: LlavaConfig, **overrides) -> LlavaConfig:
  """``config`` with fields replaced (module docstring); ValueError naming unknown overrides,
  or an ``image_token_id`` outside the vocabulary."""
  top = {f.name for f in dataclasses.fields(LlavaConfig)}
  unknown = sorted(set(overrides) - top - set(_DECODER_OVERRIDES) - set(_EVERYWHERE_OVERRIDES))
  if unknown:
    raise ValueError(f"unknown overrides {unknown}; expected fields of LlavaConfig {sorted(top)} or "
                     f"{sorted(_DECODER_OVERRIDES + _EVERYWHERE_OVERRIDES)}")
  config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in top})
  decoder = {k: overrides[k] for k in _DECODER_OVERRIDES if k in overrides}
  everywhere = {k: overrides[k] for k in _EVERYWHERE_OVERRIDES if k in overrides}
  if decoder or everywhere:
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, **everywhere),
                                 decoder=dataclasses.replace(config.decoder, **decoder, **everywhere))
  vocab = config.decoder.vocab_size
  if not 0 <= config.image_token_id < vocab:
    raise ValueError(f"image_token_id={config.image_token_id} is outside the vocabulary [0, {vocab})")
  return config
