"""A Hugging Face causal LM from a directory the user already has -> ``Decoder`` params: its
``config.json`` picks the converter (``architectures[0]`` in ``ARCHITECTURES``) and the
``DecoderConfig``; the weights are read one tensor at a time.

Weight layouts accepted (what ``save_pretrained`` writes), looked for in this order:

  model.safetensors.index.json    + the shards its weight_map names
  model.safetensors
  pytorch_model.bin.index.json    + the shards its weight_map names
  pytorch_model.bin

``.bin`` files are opened only with ``torch.load(weights_only=True, mmap=True)``: a pickle
of anything but tensors is refused, never executed (``state_dict.TorchFile``).

Memory: the state_dict is a ``state_dict.LazyStateDict``; the converters read each key once,
so the host holds the params built so far plus the tensor being converted (float16 and
bfloat16 widen to float32 one tensor at a time). Casting to ``dtype`` and stacking the layers
for ``scan_layers`` then go leaf by leaf, dropping each source array once copied. Peak: the
float32 params plus the largest tensor (measured in ``tests/convert/test_hf_lm.py``).

The `lm` family's ``load_hf_lm`` (``mmjax.families.lm.convert``) wraps ``load_hf_decoder``
into an ``LMConfig`` and ``{"decoder": ...}``; this module stays below the families
(docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf_gpt_neox, hf_llama, hf_mpt, hf_opt, hf_persimmon, hf_phi, mosaic_gpt
from mmjax.convert.state_dict import LazyStateDict, SafetensorsFile, TorchFile
from mmjax.models.decoder import DecoderConfig
from mmjax.models.scan_layout import scan_plan


class Importer(NamedTuple):
  # (config.json as a dict, **DecoderConfig overrides) -> DecoderConfig
  config: Callable[..., DecoderConfig]
  # (state_dict, DecoderConfig) -> unrolled Decoder params; one ValueError lists every bad key
  convert: Callable[[Mapping[str, Any], DecoderConfig], dict]


# config.json's architectures[0] -> its importer: a new architecture is one line here.
ARCHITECTURES: dict[str, Importer] = {
    "LlamaForCausalLM": Importer(hf_llama.config_from_hf_llama, hf_llama.llama_from_state_dict),
    "Qwen2ForCausalLM": Importer(hf_llama.config_from_hf_llama, hf_llama.llama_from_state_dict),
    "StableLmForCausalLM": Importer(hf_llama.config_from_hf_llama, hf_llama.llama_from_state_dict),
    "GPTNeoXForCausalLM": Importer(hf_gpt_neox.config_from_hf_gpt_neox, hf_gpt_neox.gpt_neox_from_state_dict),
    "PhiForCausalLM": Importer(hf_phi.config_from_hf_phi, hf_phi.phi_from_state_dict),
    "MistralForCausalLM": Importer(hf_llama.config_from_hf_llama, hf_llama.llama_from_state_dict),
    "MptForCausalLM": Importer(hf_mpt.config_from_hf_mpt, hf_mpt.mpt_from_state_dict),
    "OPTForCausalLM": Importer(hf_opt.config_from_hf_opt, hf_opt.opt_from_state_dict),
    "PersimmonForCausalLM": Importer(hf_persimmon.config_from_hf_persimmon, hf_persimmon.persimmon_from_state_dict),
    # MPT-1B-RedPajama (OpenFlamingo-3B's LM) as published: MPT's April 2023 predecessor.
    "MosaicGPT": Importer(mosaic_gpt.config_from_mosaic_gpt, mosaic_gpt.mosaic_gpt_from_state_dict),
}

# (file name, how to open each weight file), in the order they are looked for.
_WEIGHT_LAYOUTS = (("model.safetensors.index.json", SafetensorsFile), ("model.safetensors", SafetensorsFile),
                   ("pytorch_model.bin.index.json", TorchFile), ("pytorch_model.bin", TorchFile))


def read_hf_config(directory: str | os.PathLike) -> dict:
  """``{directory}/config.json`` as a dict."""
  path = os.path.join(os.fspath(directory), "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{path} does not exist; expected a Hugging Face model directory: config.json and "
                     f"one of {[name for name, _ in _WEIGHT_LAYOUTS]}")
  with open(path) as f:
    return json.load(f)


def importer_of(hf_config: Mapping[str, Any]) -> Importer:
  """The importer of ``hf_config["architectures"][0]``."""
  architectures = hf_config.get("architectures") or [None]
  if architectures[0] not in ARCHITECTURES:
    raise ValueError(f"config.json architectures={hf_config.get('architectures')} is not supported; expected "
                     f"one of {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[architectures[0]]


def decoder_config_from_hf(hf_config: Mapping[str, Any], **overrides) -> DecoderConfig:
  """The ``DecoderConfig`` of a ``config.json`` dict, with ``overrides`` (DecoderConfig fields)."""
  fields = {f.name for f in dataclasses.fields(DecoderConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"overrides {unknown} are not DecoderConfig fields; expected some of {sorted(fields)}")
  return importer_of(hf_config).config(hf_config, **overrides)


def _index_files(directory: str, index_name: str, open_file) -> list:
  """The shards an ``*.index.json`` names, each opened; one error lists the missing ones."""
  index_path = os.path.join(directory, index_name)
  with open(index_path) as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index_path} has no weight_map (tensor name -> shard file)")
  shards = sorted(set(weight_map.values()))
  outside = [s for s in shards if os.path.basename(s) != s]
  if outside:
    raise ValueError(f"{index_path} names shards outside its directory: {outside}")
  missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
  if missing:
    raise ValueError(f"{index_path} names shards that do not exist in {directory}: {missing}")
  files = {s: open_file(os.path.join(directory, s)) for s in shards}
  absent = sorted(key for key, s in weight_map.items() if key not in files[s].shapes)
  if absent:
    raise ValueError(f"{index_path} lists tensors their shard does not hold: "
                     + ", ".join(f"{key} (in {weight_map[key]})" for key in absent))
  return list(files.values())


def open_state_dict(directory: str | os.PathLike) -> LazyStateDict:
  """The state_dict of an HF model directory, read lazily (see the module docstring)."""
  directory = os.fspath(directory)
  for name, open_file in _WEIGHT_LAYOUTS:
    if os.path.isfile(os.path.join(directory, name)):
      if name.endswith(".index.json"):
        return LazyStateDict(_index_files(directory, name, open_file))
      return LazyStateDict([open_file(os.path.join(directory, name))])
  raise ValueError(f"{directory} holds none of {[name for name, _ in _WEIGHT_LAYOUTS]}")


def _cast_in_place(tree: dict, dtype: np.dtype) -> None:
  for key, value in tree.items():
    if isinstance(value, dict):
      _cast_in_place(value, dtype)
    else:
      tree[key] = value.astype(dtype, copy=False)


def _stack_dropping(trees: list[dict], dtype: np.dtype) -> dict:
  """Leaf-wise stack of ``trees`` on a new leading axis, cast to ``dtype``; each source leaf is
  dropped from its tree once copied, so the host holds one copy plus one leaf."""
  out = {}
  for key, first in trees[0].items():
    if isinstance(first, dict):
      out[key] = _stack_dropping([t[key] for t in trees], dtype)
      continue
    stacked = np.empty((len(trees),) + first.shape, dtype)
    for i, tree in enumerate(trees):
      stacked[i] = tree[key]
      tree[key] = None
    out[key] = stacked
  return out


def finish_params(params: dict, config: DecoderConfig, dtype: str | np.dtype = "float32") -> dict:
  """Unrolled decoder params (consumed) -> their arrays cast to ``dtype``, and stacked as
  ``scan_layout.stack_layers`` stacks them (blocks of one layer) when ``config.scan_layers``."""
  dtype = np.dtype(jnp.dtype(dtype))
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype={dtype}; expected a float dtype (float32, bfloat16, float16)")
  if config.scan_layers:
    plan = scan_plan(config.depth)
    layers = [params.pop(f"layers_{i}") for i in range(plan.num_blocks)]
    params["blocks"] = {"layers_0": _stack_dropping(layers, dtype)}
  _cast_in_place(params, dtype)
  return params


def decoder_from_hf_directory(directory: str | os.PathLike, config: DecoderConfig, *,
                              dtype: str = "float32") -> dict:
  """``Decoder(config)`` params from the HF causal LM saved in ``directory``, whose config.json
  picks the converter; ``config`` (e.g. ``decoder_config_from_hf`` of that config.json, with
  overrides) must describe its weights: every key that does not fit is listed in one error."""
  directory = os.fspath(directory)
  hf_config = read_hf_config(directory)
  importer = importer_of(hf_config)
  state_dict = open_state_dict(directory)
  try:
    params = importer.convert(state_dict, config)
  except ValueError as err:
    raise ValueError(f"{directory}: its weights do not match the config ({hf_config['architectures'][0]}, "
                     f"config.json read as {config}): {err}") from err
  return finish_params(params, config, dtype)


def load_hf_decoder(directory: str | os.PathLike, *, scan_layers: bool = False, dtype: str = "float32",
                    **overrides) -> tuple[DecoderConfig, dict]:
  """(DecoderConfig, Decoder params) of the HF causal LM saved in ``directory``.

  Args:
    directory: holds config.json and the weights (module docstring: the layouts accepted).
    scan_layers: stack the layers for the scanned decoder (``DecoderConfig.scan_layers``).
    dtype: of the returned arrays (float32; bfloat16 or float16 halve the host memory).
    **overrides: other DecoderConfig fields (``max_length``, ``remat``, ``attention_backend``...).

  Raises:
    ValueError: an architecture not in ``ARCHITECTURES`` (listing them), no config.json, a
      missing shard, a pickle that is not plain tensors, or weights that disagree with
      config.json (one error listing every missing, unexpected and mis-shaped key).
  """
  config = decoder_config_from_hf(read_hf_config(directory), scan_layers=scan_layers, **overrides)
  return config, decoder_from_hf_directory(directory, config, dtype=dtype)
