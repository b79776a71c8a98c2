"""Weight import for the `lm` family: an HF `LlamaForCausalLM` state_dict (or a directory of
its safetensors) -> `LanguageModel` params ({"decoder": ...}, stacked when the config's
decoder is scanned). The renaming is the shared `mmjax.convert.hf_llama`'s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmjax.convert import hf_llama
from mmjax.families.lm.model import LMConfig
from mmjax.models.scan_layout import stack_layers


def lm_from_state_dict(sd: Mapping[str, Any], config: LMConfig) -> dict:
  """HF LLaMA state_dict (torch tensors or numpy arrays) -> `LanguageModel(config)` params;
  missing, unexpected or mis-shaped keys raise one ValueError listing them all."""
  decoder = hf_llama.llama_from_state_dict(sd, config.decoder)
  if config.decoder.scan_layers:
    decoder = stack_layers(decoder, config.decoder.depth)
  return {"decoder": decoder}


def config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides) -> LMConfig:
  """The LMConfig of an HF `LlamaConfig` (object or config.json dict)."""
  return LMConfig(hf_llama.config_from_hf_llama(hf_config, **overrides))
