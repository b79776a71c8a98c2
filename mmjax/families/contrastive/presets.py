"""The `contrastive` family's presets: CLIP and SigLIP dual encoders.

- ``clip-tiny``: CPU-sized CLIP for the embedded dataset. Its image tower is exactly
  ``flamingo/tiny``'s (64 px, the convolutional stem, width 64, 2 layers), so a Flamingo can
  freeze a tower this family pretrained (``configs/flamingo/staged.py``); the text tower is 2
  layers of width 64, causal, pooled at the end-of-text token; embeddings of width 64.
- ``siglip-tiny``: the same sizes shaped as SigLIP: no CLS token, attention-pooling head as
  the image embedding, bidirectional text pooled from the last position, biased text head,
  the sigmoid loss with its bias.

``vocab_size`` and ``eos_token_id`` of the tiny presets are the data tokenizer's, set by the
task; ``max_length`` is ``data.text_length``.

Published models, each exactly what ``convert.config_from_hf_clip`` / ``config_from_hf_siglip``
build from its Hugging Face config.json (fields it omits take transformers' defaults), so
``convert.load_hf_contrastive`` fills it. The count after each is HF's (the model built on
torch's meta device, tests/families/test_contrastive_presets.py); the figure in brackets is
open_clip's docs/model_profile.csv (github.com/mlfoundations/open_clip), millions, 2 places:

- ``clip-vit-b-16``: CLIP ViT-B/16 (Radford et al. 2021; huggingface.co/openai/clip-vit-base-patch16
  config.json: projection_dim 512, vision patch_size 16, the rest CLIPConfig's defaults: vision
  768 wide, 12 layers, 12 heads, MLP 3072, 224 px; text 512 wide, 12 layers, 8 heads, MLP
  2048, 77 positions, vocabulary 49408); 149,620,737 parameters [ViT-B-16 149.62].
- ``clip-vit-l-14``: CLIP ViT-L/14 (openai/clip-vit-large-patch14 config.json: projection_dim
  768; vision 1024 wide, 24 layers, 16 heads, MLP 4096, patch 14, 224 px; text 768 wide, 12
  layers, 12 heads, MLP 3072); 427,616,513 [ViT-L-14 427.62].
- ``clip-vit-l-14-336``: the same at 336 px (openai/clip-vit-large-patch14-336 config.json:
  vision image_size 336; LLaVA-1.5's tower); 427,944,193 [ViT-L-14-336 427.94].
- ``siglip-so400m-14-384``: SigLIP So400m/14 at 384 px (Zhai et al. 2023; Alabdulmohsin et
  al. 2023; google/siglip-so400m-patch14-384 config.json: both towers 1152 wide, 27 layers, 16
  heads, MLP 4304; vision patch 14, 384 px; text vocabulary 32000, 64 positions, head 1152);
  877,960,498 [ViT-SO400M-14-SigLIP-384 877.96].
- ``siglip-b-16-224``: SigLIP B/16 (google/siglip-base-patch16-224 config.json: text 768 wide,
  MLP 3072, 12 heads, vocabulary 32000; vision patch 16; the rest SiglipConfig's defaults: 12
  layers each, vision 768 wide, 224 px); 203,155,970 [ViT-B-16-SigLIP 203.16].

The config.json files of clip-vit-base-patch16 and clip-vit-large-patch14 say
``eos_token_id: 2`` (written before transformers PR #24773), which the importer reads as HF
does: pool the highest id. The presets name the end-of-text id, 49407, instead: it is the
highest id of CLIP's vocabulary, so both pool the same position of any text its tokenizer
makes. The published presets do not clip the temperature (``max_logit_scale=0``), as
transformers does not (``convert``'s docstring).
"""

from __future__ import annotations

import dataclasses
import math

from mmjax.families.contrastive.model import ContrastiveConfig
from mmjax.models.text_tower import TextTowerConfig
from mmjax.models.vit import CLIP_VIT_L14, CLIP_VIT_L14_336, SIGLIP_SO400M_14_384, ViTConfig

_TINY_VISION = ViTConfig(image_size=64, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128,
                         class_token=True, activation="quick_gelu", stem="conv")
_TINY_TEXT = TextTowerConfig(vocab_size=256, width=64, depth=2, num_heads=4, mlp_dim=128, max_length=32,
                             activation="quick_gelu", causal=True, pooling="eos", eos_token_id=3,
                             projection_dim=64)

_PRESETS = {
    "clip-tiny": ContrastiveConfig(vision=_TINY_VISION, text=_TINY_TEXT, vision_projection_dim=64,
                                   loss="softmax", logit_scale_init=math.log(1 / 0.07)),
    "siglip-tiny": ContrastiveConfig(
        vision=dataclasses.replace(_TINY_VISION, class_token=False, pre_norm=False, patch_bias=True,
                                   activation="gelu_tanh", map_head=True, norm_eps=1e-6,
                                   image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
        text=dataclasses.replace(_TINY_TEXT, activation="gelu_tanh", causal=False, pooling="last",
                                 projection_bias=True, norm_eps=1e-6),
        vision_projection_dim=0, loss="sigmoid", logit_scale_init=math.log(10.0), logit_bias_init=-10.0),
}

# The published models (module docstring). HF's logit_scale_init_value, 2.6592, is log(1/0.07)
# rounded; SigLIP's config.json has none: the paper's log 10 and -10.
_CLIP_B16_VISION = dataclasses.replace(CLIP_VIT_L14, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072)
_CLIP_TEXT = TextTowerConfig(vocab_size=49408, width=512, depth=12, num_heads=8, mlp_dim=2048, max_length=77,
                             activation="quick_gelu", norm_eps=1e-5, causal=True, pooling="eos", eos_token_id=49407,
                             projection_dim=512, projection_bias=False)
_CLIP_L14_TEXT = dataclasses.replace(_CLIP_TEXT, width=768, num_heads=12, mlp_dim=3072, projection_dim=768)
_CLIP = dict(loss="softmax", logit_scale_init=2.6592, max_logit_scale=0.0)
_SIGLIP_B16_VISION = dataclasses.replace(SIGLIP_SO400M_14_384, image_size=224, patch_size=16, width=768, depth=12,
                                         num_heads=12, mlp_dim=3072)
_SIGLIP_TEXT = TextTowerConfig(vocab_size=32000, width=768, depth=12, num_heads=12, mlp_dim=3072, max_length=64,
                               activation="gelu_tanh", norm_eps=1e-6, causal=False, pooling="last", eos_token_id=None,
                               projection_dim=768, projection_bias=True)
_SIGLIP = dict(vision_projection_dim=0, loss="sigmoid", logit_scale_init=math.log(10.0), logit_bias_init=-10.0,
               max_logit_scale=0.0)

_PRESETS.update({
    "clip-vit-b-16": ContrastiveConfig(vision=_CLIP_B16_VISION, text=_CLIP_TEXT, vision_projection_dim=512, **_CLIP),
    "clip-vit-l-14": ContrastiveConfig(vision=CLIP_VIT_L14, text=_CLIP_L14_TEXT, vision_projection_dim=768, **_CLIP),
    "clip-vit-l-14-336": ContrastiveConfig(vision=CLIP_VIT_L14_336, text=_CLIP_L14_TEXT, vision_projection_dim=768,
                                           **_CLIP),
    "siglip-so400m-14-384": ContrastiveConfig(
        vision=SIGLIP_SO400M_14_384,
        text=dataclasses.replace(_SIGLIP_TEXT, width=1152, depth=27, num_heads=16, mlp_dim=4304, projection_dim=1152),
        **_SIGLIP),
    "siglip-b-16-224": ContrastiveConfig(vision=_SIGLIP_B16_VISION, text=_SIGLIP_TEXT, **_SIGLIP),
})

# The counts the sources give, for the docs' tables (a test checks each against eval_shape):
# an int is an exact count; a string the source's rounded figure ("149.62M": millions).
PUBLISHED_PARAMETERS: dict[str, int | str | None] = {
    "clip-tiny": None, "siglip-tiny": None,
    # open_clip docs/model_profile.csv, column mparams (the module docstring).
    "clip-vit-b-16": "149.62M", "clip-vit-l-14": "427.62M", "clip-vit-l-14-336": "427.94M",
    "siglip-so400m-14-384": "877.96M", "siglip-b-16-224": "203.16M",
}


def presets() -> dict[str, ContrastiveConfig]:
  return dict(_PRESETS)


_TOWER_FIELDS = {"dtype", "attention_backend"}


def override(config: ContrastiveConfig, **overrides) -> ContrastiveConfig:
  """``config`` with fields replaced: ContrastiveConfig's own, or ``dtype`` /
  ``attention_backend`` for both towers (ValueError naming unknown ones)."""
  own = {f.name for f in dataclasses.fields(ContrastiveConfig)}
  unknown = sorted(set(overrides) - own - _TOWER_FIELDS)
  if unknown:
    raise ValueError(f"unknown overrides {unknown}; expected fields of ContrastiveConfig {sorted(own)} or "
                     f"{sorted(_TOWER_FIELDS)}")
  towers = {k: overrides.pop(k) for k in list(overrides) if k in _TOWER_FIELDS}
  if towers:
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, **towers),
                                 text=dataclasses.replace(config.text, **towers))
  return dataclasses.replace(config, **overrides)
