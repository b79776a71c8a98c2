"""The `lm` family's presets: the decoders of published language models at their published
sizes, every number from the model's own config.json (cited below; the figure after each is
the published parameter count a test checks the preset's ``jax.eval_shape`` count against).

- ``lm-tiny``: CPU-sized (width 128, 4 layers, vocabulary 1024): the LM of ``flamingo-tiny``,
  so a ``flamingo/staged`` run can start from an ``lm/tiny`` checkpoint.
- ``tinyllama-1.1b``: TinyLlama-1.1B (Zhang et al. 2024; HF TinyLlama/TinyLlama-1.1B): 22
  layers, width 2048, 32 heads of 64 with 4 key/value heads, SwiGLU 5632; 1,100,048,384
  parameters (its model card says 1.1B).
- ``llama-7b``: LLaMA-7B (Touvron et al. 2023, Table 2): 32 layers, width 4096, 32 heads,
  SwiGLU 11008, vocabulary 32000; 6,738,415,616 parameters (the paper's 6.7B).

The LMs the multimodal designs stand on (issue 15), each from its HF config.json:

- ``llama2-7b``: LLaMA-2-7B (huggingface.co/meta-llama/Llama-2-7b-hf config.json): 32
  layers, width 4096, 32 heads (no GQA at 7B), SwiGLU 11008, vocabulary 32000, rms_norm_eps
  1e-5, max_position_embeddings 4096, untied; 6,738,415,616 parameters (model card: 7B).
- ``vicuna-7b-v1.5``: Vicuna-7B v1.5 (lmsys/vicuna-7b-v1.5 config.json), LLaMA-2-7B
  fine-tuned: the same numbers; 6,738,415,616 (the name's 7B). LLaVA-1.5's LM.
- ``mpt-1b-redpajama``: mosaicml/mpt-1b-redpajama-200b's config.json (d_model 2048,
  n_layers 24, n_heads 16, mlp_ratio 4, vocab_size 50432, max_seq_len 2048, alibi true,
  alibi_bias_max 8, no_bias true, attn_qk_ln true): LayerNorms without bias, GELU MLP,
  ALiBi, tied embeddings, and MosaicGPT's LayerNorm over the whole 2048-wide query and key
  (qk_norm="width"); 1,311,442,944 parameters (model card: "a 1.3 billion parameter
  decoder-only transformer"). OpenFlamingo-3B's LM; its published weights import through
  ``mmjax.convert.mosaic_gpt`` (``load_hf_lm`` reads ``architectures: ["MosaicGPT"]``).
- ``mpt-7b``: mosaicml/mpt-7b config.json (d_model 4096, n_layers 32, n_heads 32,
  expansion_ratio 4, vocab_size 50432, max_seq_len 2048, alibi, no_bias, clip_qkv null,
  qk_ln false); 6,649,286,656 parameters, the checkpoint's own count (its
  pytorch_model.bin.index.json total_size 13,298,573,312 bytes of bfloat16). OpenFlamingo-9B's
  LM.
- ``redpajama-incite-3b``: togethercomputer/RedPajama-INCITE-Base-3B-v1 config.json
  (GPT-NeoX: hidden_size 2560, 32 layers, 32 heads, intermediate 10240, vocabulary 50432,
  rotary_pct 1.0, use_parallel_residual false, layer_norm_eps 1e-5, untied); 2,775,864,320
  parameters (together.ai/blog/redpajama-models-v1: "a 3 billion ... parameter base model").
  OpenFlamingo-4B's LM.
- ``opt-2.7b``: facebook/opt-2.7b config.json (hidden_size 2560, 32 layers, 32 heads,
  ffn_dim 10240, ReLU, vocabulary 50272, max_position_embeddings 2048 with OPT's offset of
  2 learned rows, pre-norm, tied); 2,651,596,800 parameters (Zhang et al. 2022: 2.7B).
  BLIP-2's smallest LM.
- ``qwen2-7b``: Qwen/Qwen2-7B config.json (hidden_size 3584, 28 layers, 28 heads with 4
  key/value heads, intermediate 18944, vocabulary 152064, rope_theta 1e6, rms_norm_eps
  1e-6, max_position_embeddings 131072, use_sliding_window false, untied; q/k/v biases);
  7,615,616,512 parameters, the checkpoint's own count (model.safetensors.index.json
  total_size 15,231,233,024 bytes of bfloat16, the figure of the identically shaped
  Qwen2.5-7B checkpoint; the name's "7B" rounds it down).
- ``mistral-7b``: mistralai/Mistral-7B-v0.1 config.json (hidden_size 4096, 32 layers, 32
  heads with 8 key/value heads, intermediate 14336, vocabulary 32000, rms_norm_eps 1e-5,
  rope_theta 1e4, sliding_window 4096, max_position_embeddings 32768, untied);
  7,241,732,096 parameters, the checkpoint's own count (model.safetensors.index.json
  total_size 14,483,464,192 bytes of bfloat16).
- ``phi-2``: microsoft/phi-2 config.json (hidden_size 2560, 32 layers, 32 heads,
  intermediate 10240, gelu_new, partial_rotary_factor 0.4, layer_norm_eps 1e-5, vocabulary
  51200, max_position_embeddings 2048, untied lm_head with bias); 2,779,683,840
  parameters, the checkpoint's own count (model.safetensors.index.json total_size
  5,559,367,680 bytes of float16).
- ``stablelm-2-1.6b``: stabilityai/stablelm-2-1_6b config.json (hidden_size 2048, 24
  layers, 32 heads, intermediate 5632, SwiGLU, LayerNorm eps 1e-5, partial_rotary_factor
  0.25, use_qkv_bias true, qk_layernorm false, use_parallel_residual false, vocabulary
  100352, max_position_embeddings 4096, untied); 1,644,515,328 parameters (the name's 1.6B).
  StableLM-2-12B's qk-norm and parallel form are what the importer refuses; the
  1.6B model uses neither.
- ``persimmon-8b``: adept/persimmon-8b-base config.json (hidden_size 4096, 36 layers, 64
  heads, intermediate 16384, relu2, qk_layernorm, rope_theta 25000, partial rotary 0.5 (the
  transformers default: the config.json names none), layer_norm_eps 1e-5, vocabulary
  262144, max_position_embeddings 16384, untied); 9,397,175,296 parameters, of which 2.15B
  are the two 262,144-row embedding tables (70k of the rows unused, kept for multimodal
  extensions). Adept's release post gives only "fewer than 10 billion parameters"; the
  "8B" is the name. Fuyu's LM.

Overrides (``mmjax.zoo.get(name, **overrides)``): any DecoderConfig field (``scan_layers``,
``dtype``, ``max_length``, ...).
"""

from __future__ import annotations

import dataclasses

from mmjax.families.lm.model import LMConfig
from mmjax.models.decoder import DecoderConfig

_LLAMA2_7B = DecoderConfig(
    vocab_size=32000, width=4096, depth=32, num_heads=32, num_kv_heads=32, head_dim=128, mlp_dim=11008,
    max_length=4096, norm_eps=1e-5)

_PRESETS = {
    "lm-tiny": LMConfig(DecoderConfig(
        vocab_size=1024, width=128, depth=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=256,
        max_length=512, tie_embeddings=True)),
    "tinyllama-1.1b": LMConfig(DecoderConfig(
        vocab_size=32000, width=2048, depth=22, num_heads=32, num_kv_heads=4, head_dim=64, mlp_dim=5632,
        max_length=2048, norm_eps=1e-5)),
    "llama-7b": LMConfig(DecoderConfig(
        vocab_size=32000, width=4096, depth=32, num_heads=32, num_kv_heads=32, head_dim=128, mlp_dim=11008,
        max_length=2048, norm_eps=1e-6)),
    "llama2-7b": LMConfig(_LLAMA2_7B),
    "vicuna-7b-v1.5": LMConfig(_LLAMA2_7B),
    "mpt-1b-redpajama": LMConfig(DecoderConfig(
        vocab_size=50432, width=2048, depth=24, num_heads=16, num_kv_heads=16, head_dim=128, mlp_dim=8192,
        max_length=2048, norm="layer", norm_bias=False, norm_eps=1e-5, mlp="gelu", positions="alibi",
        alibi_bias_max=8.0, tie_embeddings=True, qk_norm="width")),
    "mpt-7b": LMConfig(DecoderConfig(
        vocab_size=50432, width=4096, depth=32, num_heads=32, num_kv_heads=32, head_dim=128, mlp_dim=16384,
        max_length=2048, norm="layer", norm_bias=False, norm_eps=1e-5, mlp="gelu", positions="alibi",
        alibi_bias_max=8.0, tie_embeddings=True)),
    "redpajama-incite-3b": LMConfig(DecoderConfig(
        vocab_size=50432, width=2560, depth=32, num_heads=32, num_kv_heads=32, head_dim=80, mlp_dim=10240,
        max_length=2048, norm="layer", norm_eps=1e-5, mlp="gelu", mlp_bias=True, attention_bias=True,
        attention_out_bias=True, rotary_fraction=1.0, parallel_residual=False)),
    "opt-2.7b": LMConfig(DecoderConfig(
        vocab_size=50272, width=2560, depth=32, num_heads=32, num_kv_heads=32, head_dim=80, mlp_dim=10240,
        max_length=2048, norm="layer", norm_eps=1e-5, mlp="relu", mlp_bias=True, attention_bias=True,
        attention_out_bias=True, positions="learned", position_offset=2, tie_embeddings=True)),
    "qwen2-7b": LMConfig(DecoderConfig(
        vocab_size=152064, width=3584, depth=28, num_heads=28, num_kv_heads=4, head_dim=128, mlp_dim=18944,
        max_length=131072, norm_eps=1e-6, rope_theta=1_000_000.0, attention_bias=True)),
    "mistral-7b": LMConfig(DecoderConfig(
        vocab_size=32000, width=4096, depth=32, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14336,
        max_length=32768, norm_eps=1e-5, sliding_window=4096)),
    "phi-2": LMConfig(DecoderConfig(
        vocab_size=51200, width=2560, depth=32, num_heads=32, num_kv_heads=32, head_dim=80, mlp_dim=10240,
        max_length=2048, norm="layer", norm_eps=1e-5, mlp="gelu_tanh", mlp_bias=True, attention_bias=True,
        attention_out_bias=True, parallel_residual=True, parallel_norms=1, rotary_fraction=0.4,
        lm_head_bias=True)),
    "stablelm-2-1.6b": LMConfig(DecoderConfig(
        vocab_size=100352, width=2048, depth=24, num_heads=32, num_kv_heads=32, head_dim=64, mlp_dim=5632,
        max_length=4096, norm="layer", norm_eps=1e-5, rotary_fraction=0.25, attention_bias=True)),
    "persimmon-8b": LMConfig(DecoderConfig(
        vocab_size=262144, width=4096, depth=36, num_heads=64, num_kv_heads=64, head_dim=64, mlp_dim=16384,
        max_length=16384, norm="layer", norm_eps=1e-5, mlp="relu2", mlp_bias=True, attention_bias=True,
        attention_out_bias=True, qk_norm="head", rope_theta=25000.0, rotary_fraction=0.5)),
}

# The counts the sources give, for the docs' tables (a test checks each against eval_shape):
# an int is an exact count; a string is the source's rounded figure ("1.3B": within half a
# unit of its last digit; "<10B": below), checked within its rounding.
PUBLISHED_PARAMETERS = {
    "lm-tiny": None, "tinyllama-1.1b": 1_100_048_384, "llama-7b": 6_738_415_616,
    "llama2-7b": "7B", "vicuna-7b-v1.5": "7B", "mpt-1b-redpajama": "1.3B", "mpt-7b": 6_649_286_656,
    "redpajama-incite-3b": "3B", "opt-2.7b": "2.7B", "qwen2-7b": 7_615_616_512, "mistral-7b": 7_241_732_096,
    "phi-2": 2_779_683_840, "stablelm-2-1.6b": "1.6B", "persimmon-8b": "<10B",
}


def presets() -> dict[str, LMConfig]:
  return dict(_PRESETS)


def override(config: LMConfig, **overrides) -> LMConfig:
  """``config`` with DecoderConfig fields replaced (ValueError naming unknown ones)."""
  known = {f.name for f in dataclasses.fields(DecoderConfig)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"unknown overrides {unknown}; expected fields of DecoderConfig {sorted(known)}")
  return LMConfig(dataclasses.replace(config.decoder, **overrides))
