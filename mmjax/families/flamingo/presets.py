"""The Flamingo family's presets (``mmjax.zoo.get(name, **overrides)`` finds them).

Each preset is a ``FlamingoConfig`` whose sizes match a published model:

- ``flamingo-tiny``: a CPU-sized model for tests, demos and the embedded dataset (32 px
  images, 2-layer ViT, 2-layer resampler, 4-layer decoder of width 128, vocabulary 1024).

The released OpenFlamingo v2 models (open_flamingo README's model table, HF
openflamingo/OpenFlamingo-*), each with its exact LM, importable with
``mmjax.families.flamingo.convert.load_open_flamingo`` (docs/models.md, "OpenFlamingo
released checkpoints"). All three share OpenAI CLIP ViT-L/14 at 224 px (open_clip
"ViT-L-14"/"openai"), whose patch tokens reach the resampler WITHOUT ln_post
(``post_norm_tokens=False``: open_clip < 2.23, what they were trained with), and the
resampler ``PerceiverResampler(dim=1024)`` with its defaults (6 layers, 8 heads of 64, 64
latents, no media/frame embeddings); each gated cross-attention block has 8 heads of 64 and
an MLP of 4x the LM width. The vocabulary is the LM's tokenizer (EleutherAI/gpt-neox-20b's,
50277 entries) plus ``<|endofchunk|>`` (50277), ``<image>`` (50278) and ``<PAD>`` (50279):
open_flamingo's factory resizes the embeddings to those 50280 rows.

- ``openflamingo-3b``: OpenFlamingo-3B-vitl-mpt1b: anas-awadalla/mpt-1b-redpajama-200b
  (MosaicGPT; config.json: d_model 2048, n_layers 24, n_heads 16, mlp_ratio 4, alibi,
  alibi_bias_max 8, no_bias, vocab_size 50432, max_seq_len 2048), a cross-attention before
  every layer (cross_attn_every_n_layers=1). MPT-1B's attn_qk_ln (a LayerNorm without bias
  over the whole query and key) is ``qk_norm="width"``.
- ``openflamingo-4b``: OpenFlamingo-4B-vitl-rpj3b: togethercomputer/RedPajama-INCITE-Base-3B-v1
  (GPT-NeoX; config.json: hidden_size 2560, 32 layers, 32 heads, intermediate 10240,
  rotary_pct 1.0, use_parallel_residual false, layer_norm_eps 1e-5, untied), a
  cross-attention before every 2nd layer.
- ``openflamingo-9b``: OpenFlamingo-9B-vitl-mpt7b: anas-awadalla/mpt-7b (mosaicml/mpt-7b;
  d_model 4096, 32 layers, 32 heads, expansion_ratio 4, ALiBi, no_bias, clip_qkv null,
  qk_ln false), a cross-attention before every 4th layer.
- ``flamingo-80b``: the Flamingo paper's 80B model (Alayrac et al. 2022, appendix
  Table 4): a Chinchilla-70B-like LM (80 layers, width 8192, 64 heads of 128, vocabulary
  32000) with a cross-attention (64 heads) before every 7th layer (11 of them, where
  open_flamingo's placement rule (i + 1) % 7 == 0 puts them in 80 layers), a 6-layer
  resampler of width 1536 with 16 heads and 64 latents. The paper's vision encoder is an
  NFNet-F6 (about 440M parameters, 1536-channel features); mmjax has no NFNet, so this
  preset uses a ViT of comparable size and the same feature width (width 1536, 16 layers,
  16 heads, MLP 6144, patch 14 at 224 px: about 450M). Its decoder is LLaMA-style (RMSNorm,
  RoPE, SwiGLU of about 8D/3 so the MLP holds as many weights as a 4D one); Chinchilla used
  relative position encodings.

A work directory recorded under an earlier version of these presets (the OpenFlamingo names
once carried LLaMA-shaped LMs) keeps training and loading through its recorded config: the
presets are read only when a run starts.

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

# What OpenFlamingo's released models read: open_clip < 2.23's patch tokens, before ln_post.
OPENFLAMINGO_VIT_L14 = dataclasses.replace(CLIP_VIT_L14, post_norm_tokens=False)

# OpenFlamingo's PerceiverResampler(dim=vis_dim) with its defaults.
OPENFLAMINGO_RESAMPLER = PerceiverConfig(
    width=1024, depth=6, num_heads=8, head_dim=64, num_latents=64, ff_mult=4)

_OPENFLAMINGO_VOCAB = 50280  # GPT-NeoX tokenizer (50277) + <|endofchunk|>, <image>, <PAD>
_OPENFLAMINGO_EOC, _OPENFLAMINGO_IMAGE = 50277, 50278


def _mpt(width: int, depth: int, heads: int, qk_norm: str = "none") -> DecoderConfig:
  """An MPT/MosaicGPT LM: ALiBi (bias max 8), LayerNorms without bias, GELU MLP of 4x the
  width, no linear biases, tied embeddings (``mmjax.convert.hf_mpt.config_from_hf_mpt``,
  ``mmjax.convert.mosaic_gpt.config_from_mosaic_gpt``)."""
  return DecoderConfig(
      vocab_size=_OPENFLAMINGO_VOCAB, width=width, depth=depth, num_heads=heads, num_kv_heads=heads,
      head_dim=width // heads, mlp_dim=4 * width, max_length=2048, norm="layer", norm_bias=False,
      norm_eps=1e-5, mlp="gelu", positions="alibi", alibi_bias_max=8.0, tie_embeddings=True, qk_norm=qk_norm)


def _openflamingo(decoder: DecoderConfig, every: int) -> FlamingoConfig:
  return FlamingoConfig(
      vision=OPENFLAMINGO_VIT_L14, resampler=OPENFLAMINGO_RESAMPLER, decoder=decoder,
      cross_attn_every_n_layers=every, xattn_num_heads=8, xattn_head_dim=64, xattn_ff_mult=4,
      media_token_id=_OPENFLAMINGO_IMAGE, end_of_chunk_token_id=_OPENFLAMINGO_EOC)


# RedPajama-INCITE-Base-3B-v1 (GPT-NeoX, sequential residual, full rotary, untied).
_REDPAJAMA_3B = DecoderConfig(
    vocab_size=_OPENFLAMINGO_VOCAB, width=2560, depth=32, num_heads=32, num_kv_heads=32, head_dim=80,
    mlp_dim=10240, max_length=2048, norm="layer", norm_eps=1e-5, mlp="gelu", mlp_bias=True,
    attention_bias=True, attention_out_bias=True, rotary_fraction=1.0, parallel_residual=False)

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
    "openflamingo-3b": _openflamingo(_mpt(width=2048, depth=24, heads=16, qk_norm="width"), every=1),
    "openflamingo-4b": _openflamingo(_REDPAJAMA_3B, every=2),
    "openflamingo-9b": _openflamingo(_mpt(width=4096, depth=32, heads=32), every=4),
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
    "openflamingo-4b": "4B (open_flamingo README)",
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
