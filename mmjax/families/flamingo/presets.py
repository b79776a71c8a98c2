"""The Flamingo family's presets (``mmjax.zoo.get(name, **overrides)`` finds them).

Each preset is a ``FlamingoConfig`` whose sizes match a published model:

- ``flamingo-tiny``: a CPU-sized model for tests, demos and the embedded dataset (32 px
  images, 2-layer ViT, 2-layer resampler, 4-layer decoder of width 128, vocabulary 1024).
- ``openflamingo-3b``: OpenFlamingo-3B-vitl-mpt1b: OpenAI CLIP ViT-L/14 (224 px), a
  6-layer resampler with 64 latents, MPT-1B (24 layers, width 2048, 16 heads) with a
  gated cross-attention before every layer.
- ``openflamingo-9b``: OpenFlamingo-9B-vitl-mpt7b: CLIP ViT-L/14, the same resampler,
  MPT-7B (32 layers, width 4096, 32 heads) with a cross-attention before every 4th layer.
- ``flamingo-80b``: the Flamingo paper's 80B model (Alayrac et al. 2022, appendix
  Table 4): a Chinchilla-70B-like LM (80 layers, width 8192, 64 heads of 128, vocabulary
  32000) with a cross-attention (64 heads) before every 7th layer (11 of them, where
  open_flamingo's placement rule (i + 1) % 7 == 0 puts them in 80 layers), a 6-layer resampler of width 1536 with 16 heads and 64 latents. The
  paper's vision encoder is an NFNet-F6 (about 440M parameters, 1536-channel features);
  mmjax has no NFNet, so this preset uses a ViT of comparable size and the same feature
  width (width 1536, 16 layers, 16 heads, MLP 6144, patch 14 at 224 px: about 450M).

Differences from the originals, which change numerics but hardly the parameter counts:
mmjax's decoder is LLaMA-style (RMSNorm, RoPE, SwiGLU, no biases) while OpenFlamingo's
MPT LMs use LayerNorm, ALiBi and a GELU MLP of width 4D; the presets use a SwiGLU width
of about 8D/3 (three matrices instead of two) so the MLP parameter count matches.
Chinchilla used relative position encodings and RMSNorm. OpenFlamingo's MPT checkpoints
cannot be imported into this decoder (only LLaMA-architecture LMs can, see
``mmjax.convert``). The MPT vocabularies are the GPT-NeoX tokenizer plus
``<|endofchunk|>``, ``<image>`` and ``<PAD>`` (50280 rows, embeddings tied as in MPT).

Overrides: ``get(name, vocab_size=..., media_token_id=..., end_of_chunk_token_id=...,
max_length=..., dtype=..., attention_backend=..., remat=..., scan_layers=...)`` (``scan_layers``:
the decoder's layers under ``nn.scan``, see ``mmjax.models.decoder``); any other field of
``FlamingoConfig`` (``vision``, ``resampler``, ``decoder``, ``cross_attn_every_n_layers``, ...) may be
replaced whole.
"""

from __future__ import annotations

import dataclasses

from mmjax.families.flamingo.model import FlamingoConfig
from mmjax.models.decoder import DecoderConfig
from mmjax.models.perceiver import PerceiverConfig
from mmjax.models.vit import ViTConfig

CLIP_VIT_L14 = ViTConfig(
    image_size=224, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
    class_token=True, posemb="learned", pre_norm=True, post_norm=True,
    activation="quick_gelu", patch_bias=False)

# OpenFlamingo's PerceiverResampler(dim=vis_dim) with its defaults.
OPENFLAMINGO_RESAMPLER = PerceiverConfig(
    width=1024, depth=6, num_heads=8, head_dim=64, num_latents=64, ff_mult=4)

_MPT_VOCAB = 50280  # GPT-NeoX tokenizer (50277) + <|endofchunk|>, <image>, <PAD>
_MPT_EOC, _MPT_IMAGE = 50277, 50278

_PRESETS: dict[str, FlamingoConfig] = {
    "flamingo-tiny": FlamingoConfig(
        vision=ViTConfig(
            image_size=32, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128,
            class_token=True, activation="quick_gelu"),
        resampler=PerceiverConfig(
            width=64, depth=2, num_heads=4, head_dim=16, num_latents=8, ff_mult=2,
            max_num_media=None),
        decoder=DecoderConfig(
            vocab_size=1024, width=128, depth=4, num_heads=4, num_kv_heads=2, head_dim=32,
            mlp_dim=256, max_length=512, tie_embeddings=True),
        cross_attn_every_n_layers=2,
        xattn_num_heads=4,
        xattn_head_dim=32,
        xattn_ff_mult=2,
        # The tiny sentencepiece vocab puts its user-defined symbols right after
        # <pad>, <unk>, <s>, </s>; override with the ids of the tokenizer in use.
        media_token_id=4,
        end_of_chunk_token_id=5,
    ),
    "openflamingo-3b": FlamingoConfig(
        vision=CLIP_VIT_L14,
        resampler=OPENFLAMINGO_RESAMPLER,
        decoder=DecoderConfig(
            vocab_size=_MPT_VOCAB, width=2048, depth=24, num_heads=16, num_kv_heads=16,
            head_dim=128, mlp_dim=5504, max_length=2048, tie_embeddings=True, norm_eps=1e-5),
        cross_attn_every_n_layers=1,
        xattn_num_heads=8,
        xattn_head_dim=64,
        xattn_ff_mult=4,
        media_token_id=_MPT_IMAGE,
        end_of_chunk_token_id=_MPT_EOC,
    ),
    "openflamingo-9b": FlamingoConfig(
        vision=CLIP_VIT_L14,
        resampler=OPENFLAMINGO_RESAMPLER,
        decoder=DecoderConfig(
            vocab_size=_MPT_VOCAB, width=4096, depth=32, num_heads=32, num_kv_heads=32,
            head_dim=128, mlp_dim=11008, max_length=2048, tie_embeddings=True, norm_eps=1e-5),
        cross_attn_every_n_layers=4,
        xattn_num_heads=8,
        xattn_head_dim=64,
        xattn_ff_mult=4,
        media_token_id=_MPT_IMAGE,
        end_of_chunk_token_id=_MPT_EOC,
    ),
    "flamingo-80b": FlamingoConfig(
        vision=ViTConfig(
            image_size=224, patch_size=14, width=1536, depth=16, num_heads=16, mlp_dim=6144,
            class_token=False, activation="gelu", patch_bias=True),
        resampler=PerceiverConfig(
            width=1536, depth=6, num_heads=16, head_dim=96, num_latents=64, ff_mult=4),
        decoder=DecoderConfig(
            vocab_size=32000, width=8192, depth=80, num_heads=64, num_kv_heads=64,
            head_dim=128, mlp_dim=21888, max_length=2048, tie_embeddings=False),
        cross_attn_every_n_layers=7,
        xattn_num_heads=64,
        xattn_head_dim=128,
        xattn_ff_mult=4,
        media_token_id=31998,
        end_of_chunk_token_id=31999,
    ),
}

# Published totals, for the presets table in docs/models.md.
PUBLISHED_PARAMETERS = {
    "flamingo-tiny": None,
    "openflamingo-3b": "3B (open_flamingo README)",
    "openflamingo-9b": "9B (open_flamingo README)",
    "flamingo-80b": "80B (Alayrac et al. 2022)",
}

_DECODER_OVERRIDES = ("vocab_size", "max_length", "remat", "scan_layers")
_EVERYWHERE_OVERRIDES = ("dtype", "attention_backend")


def presets() -> dict[str, FlamingoConfig]:
  """The presets by name."""
  return dict(_PRESETS)


def override(config: FlamingoConfig, **overrides) -> FlamingoConfig:
  """``config`` with fields replaced by ``overrides`` (see the module docstring)."""
  top_fields = {f.name for f in dataclasses.fields(FlamingoConfig)}
  unknown = sorted(set(overrides) - top_fields - set(_DECODER_OVERRIDES) - set(_EVERYWHERE_OVERRIDES))
  if unknown:
    raise ValueError(
        f"unknown overrides {unknown}; expected fields of FlamingoConfig {sorted(top_fields)}"
        f" or {sorted(_DECODER_OVERRIDES + _EVERYWHERE_OVERRIDES)}")
  config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in top_fields})
  decoder_kw = {k: overrides[k] for k in _DECODER_OVERRIDES if k in overrides}
  everywhere = {k: overrides[k] for k in _EVERYWHERE_OVERRIDES if k in overrides}
  if decoder_kw or everywhere:
    config = dataclasses.replace(
        config,
        vision=dataclasses.replace(config.vision, **everywhere),
        resampler=dataclasses.replace(config.resampler, **everywhere),
        decoder=dataclasses.replace(config.decoder, **decoder_kw, **everywhere),
    )
  vocab = config.decoder.vocab_size
  for field in ("media_token_id", "end_of_chunk_token_id"):
    value = getattr(config, field)
    if not 0 <= value < vocab:
      raise ValueError(f"{field}={value} is outside the vocabulary [0, {vocab})")
  return config
