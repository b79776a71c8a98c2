"""The `lm` family's presets: the decoder sizes of published LLaMA-architecture models.

- ``lm-tiny``: CPU-sized (width 128, 4 layers, vocabulary 1024): the LM of ``flamingo-tiny``,
  so a ``flamingo/staged`` run can start from an ``lm/tiny`` checkpoint.
- ``tinyllama-1.1b``: TinyLlama-1.1B (Zhang et al. 2024; HF TinyLlama/TinyLlama-1.1B): 22
  layers, width 2048, 32 heads of 64 with 4 key/value heads, SwiGLU 5632; 1,100,048,384
  parameters (its model card says 1.1B).
- ``llama-7b``: LLaMA-7B (Touvron et al. 2023, Table 2): 32 layers, width 4096, 32 heads,
  SwiGLU 11008, vocabulary 32000; 6,738,415,616 parameters (the paper's 6.7B).

Overrides (``mmjax.zoo.get(name, **overrides)``): any DecoderConfig field (``scan_layers``,
``dtype``, ``max_length``, ...).
"""

from __future__ import annotations

import dataclasses

from mmjax.families.lm.model import LMConfig
from mmjax.models.decoder import DecoderConfig

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
}

# The totals the sources give, for docs/families.md's table (checked by a test against eval_shape).
PUBLISHED_PARAMETERS = {"lm-tiny": None, "tinyllama-1.1b": 1_100_048_384, "llama-7b": 6_738_415_616}


def presets() -> dict[str, LMConfig]:
  return dict(_PRESETS)


def override(config: LMConfig, **overrides) -> LMConfig:
  """``config`` with DecoderConfig fields replaced (ValueError naming unknown ones)."""
  known = {f.name for f in dataclasses.fields(DecoderConfig)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"unknown overrides {unknown}; expected fields of DecoderConfig {sorted(known)}")
  return LMConfig(dataclasses.replace(config.decoder, **overrides))
