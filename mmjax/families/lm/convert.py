"""Weight import for the `lm` family: an HF `LlamaForCausalLM` state_dict, or any HF causal LM
directory of an architecture `mmjax.convert.hf_lm` knows (`load_hf_lm`) -> `LanguageModel`
params ({"decoder": ...}, stacked when the config's decoder is scanned). The renaming is the
shared `mmjax.convert` converters'."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmjax.convert import hf_llama, hf_lm
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


def load_hf_lm(directory, *, scan_layers: bool = False, dtype: str = "float32", **overrides) -> tuple[LMConfig, dict]:
  """(LMConfig, `LanguageModel` params) of an HF causal LM saved in `directory`: config.json
  plus safetensors or pytorch_model.bin, sharded or not; its `architectures[0]` picks the
  importer (`mmjax.convert.hf_lm.ARCHITECTURES`). `dtype` is the params'; `overrides` are
  DecoderConfig fields. Weights are read one tensor at a time (`mmjax.convert.hf_lm`)."""
  decoder_config, decoder = hf_lm.load_hf_decoder(directory, scan_layers=scan_layers, dtype=dtype, **overrides)
  return LMConfig(decoder_config), {"decoder": decoder}


def lm_from_hf_directory(directory, config: LMConfig) -> dict:
  """The family's "hf" importer: `LanguageModel(config)` params from an HF model directory
  (`load_hf_lm` reads its config too); weights that do not fit `config` raise one ValueError."""
  return {"decoder": hf_lm.decoder_from_hf_directory(directory, config.decoder)}
