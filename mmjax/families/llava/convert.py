"""Weight import for the `llava` family: a Hugging Face ``LlavaForConditionalGeneration``
(LLaVA-1.5) or ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT, v1.6) -> ``Llava`` params.

Entry points:

  llava_config_from_hf(hf_config, **overrides) -> LlavaConfig
  llava_from_state_dict(state_dict, config) -> params
  llava_from_hf_directory(directory, dtype="float32", **overrides) -> (LlavaConfig, params)

The parts are read by the shared importers: the tower by ``mmjax.convert.hf_vision`` (CLIP or
SigLIP), the LM by ``mmjax.convert.hf_llama`` (LLaMA / Vicuna, Mistral, Qwen2: the LLaMA key
layout); this module adds the projector (``linear_1``, ``linear_2``: torch [out, in] ->
kernel [in, out]) and LLaVA-NeXT's ``image_newline`` [D]. Three key layouts are accepted:

  part        transformers 5.x                transformers 4.52 .. 4.57             transformers < 4.52
  tower       model.vision_tower.*            model.vision_tower.vision_model.*     vision_tower.vision_model.*
  projector   model.multi_modal_projector.*   model.multi_modal_projector.*         multi_modal_projector.*
  LM body     model.language_model.*          model.language_model.*                language_model.model.*
  LM head     lm_head.weight                  lm_head.weight                        language_model.lm_head.weight
  newline     model.image_newline             model.image_newline                   image_newline

(the oldest is told by its first level; the tower's ``vision_model.`` level is found on its
own, by ``hf_vision``).

Missing, unexpected and mis-shaped keys of all parts raise one ValueError listing them. The
tower keeps its ``post_layernorm`` (the checkpoint holds it; LLaVA reads hidden states, which
never pass through it), so imported parameter counts equal Hugging Face's.

config.json: the tower from ``vision_config`` (``model_type`` clip_vision_model, the default,
or siglip_vision_model; absent, transformers' LLaVA default, CLIP ViT-L/14 at 336 px), the
LM from ``text_config`` (llama, the default, mistral or qwen2; the fields a config.json omits
take transformers' defaults of that model_type, as transformers fills them). Read besides:
``vision_feature_layer`` (int or list), ``vision_feature_select_strategy``,
``projector_hidden_act``, ``multimodal_projector_bias``, ``image_token_index`` (or
``image_token_id``), ``tie_word_embeddings`` (top level or text_config's), and for
LLaVA-NeXT ``image_grid_pinpoints`` (transformers' five when absent) and an
``image_newline``. Pinpoints are (height, width) pairs in transformers, as in
``LlavaConfig.grid_pinpoints``: they are copied, not swapped (``anyres``'s docstring).
Processor-side fields (``image_seq_length``, ``pad_token_id``, ``ignore_index``) are not
the model's and are ignored.

Dimension letters: D the LM's width, F the tower's width, L feature layers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf_llama, hf_lm, hf_vision
from mmjax.convert.state_dict import StateDictReader
from mmjax.families.llava import presets
from mmjax.families.llava.model import LlavaConfig

# config.json's model_type -> the class whose checkpoints this module reads.
MODEL_TYPES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}

# transformers' LlavaConfig / LlavaNextConfig default tower (``sub_configs_defaults``), used
# when a config.json has no vision_config.
_DEFAULT_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                       num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)
_VISION_TYPES = {"clip_vision_model": hf_vision.config_from_hf_clip,
                 "siglip_vision_model": hf_vision.config_from_hf_siglip}

# Defaults of transformers' LlamaConfig / MistralConfig / Qwen2Config for the fields the LM
# translation reads, filled in where a text_config omits them (LLaVA's config.json files
# list only the fields that differ).
_TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    rms_norm_eps=1e-6, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6),
}

# transformers' ACT2FN names -> mmjax.layers.mlp.ACTIVATIONS.
_PROJECTOR_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                          "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu", "relu": "relu"}

# transformers' LlavaNextConfig default image_grid_pinpoints, (height, width).
_DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

# Buffers some checkpoints hold beside the parameters.
_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


# ------------------------------------------------------------------------------ configs

def _vision_config(hf_config: Mapping[str, Any]):
  vision = hf_config.get("vision_config") or _DEFAULT_VISION
  model_type = vision.get("model_type", "clip_vision_model")
  if model_type not in _VISION_TYPES:
    raise ValueError(f"vision_config.model_type={model_type!r}; expected one of {sorted(_VISION_TYPES)}")
  return _VISION_TYPES[model_type](vision)


def _decoder_config(hf_config: Mapping[str, Any]):
  text = dict(hf_config.get("text_config") or {})
  model_type = text.setdefault("model_type", "llama")
  if model_type not in _TEXT_DEFAULTS:
    raise ValueError(f"text_config.model_type={model_type!r}; expected one of {sorted(_TEXT_DEFAULTS)} "
                     "(LMs with the LLaMA key layout)")
  text = {**_TEXT_DEFAULTS[model_type], **text}
  # transformers 5 ties the head when either level says so (LlavaConfig.__post_init__).
  tie = bool(hf_config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
  return hf_llama.config_from_hf_llama(text, tie_embeddings=tie)


def _feature_layers(value: Any) -> tuple[int, ...]:
  layers = [value] if isinstance(value, int) else value
  if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
    raise ValueError(f"vision_feature_layer={value!r}; expected an int or a list of ints")
  return tuple(layers)


def _pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
  if value is None:
    return _DEFAULT_PINPOINTS
  try:
    pairs = tuple((int(h), int(w)) for h, w in value)
  except (TypeError, ValueError):
    raise ValueError(f"image_grid_pinpoints={value!r}; expected a list of [height, width] pairs") from None
  if not pairs:
    raise ValueError("image_grid_pinpoints=[]; expected at least one [height, width] pair")
  return pairs


def llava_config_from_hf(hf_config: Mapping[str, Any], **overrides) -> LlavaConfig:
  """The LlavaConfig of a ``LlavaConfig`` / ``LlavaNextConfig`` config.json dict (or config
  object); ``overrides`` as ``presets.override``'s (``dtype``, ``scan_layers``, any field).

  Raises ValueError naming the field for what ``Llava`` cannot run: another model_type, a
  tower other than CLIP or SigLIP, an LM without the LLaMA layout, an unknown projector
  activation, feature layers outside the tower, pinpoints that are not multiples of its
  resolution, select strategy "default" on a tower without a CLS token.
  """
  hf_config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  model_type = hf_config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r}; expected one of {sorted(MODEL_TYPES)} "
                     f"({', '.join(MODEL_TYPES.values())})")
  act = hf_config.get("projector_hidden_act", "gelu")
  if act not in _PROJECTOR_ACTIVATIONS:
    raise ValueError(f"projector_hidden_act={act!r}; expected one of {sorted(_PROJECTOR_ACTIVATIONS)}")
  image_token = hf_config.get("image_token_index", hf_config.get("image_token_id", 32000))
  next_ = model_type == "llava_next"
  config = LlavaConfig(
      vision=_vision_config(hf_config),
      decoder=_decoder_config(hf_config),
      vision_feature_layers=_feature_layers(hf_config.get("vision_feature_layer", -2)),
      select_strategy=hf_config.get("vision_feature_select_strategy", "default"),
      projector="mlp2x",
      projector_activation=_PROJECTOR_ACTIVATIONS[act],
      projector_bias=bool(hf_config.get("multimodal_projector_bias", True)),
      image_newline=next_,
      grid_pinpoints=_pinpoints(hf_config.get("image_grid_pinpoints")) if next_ else (),
      image_token_id=int(image_token))
  return presets.override(config, **overrides).validate()


# ------------------------------------------------------------------------------ weights

class _Renamed(Mapping):
  """A view of some keys of a state_dict under other names: {new name: source key}."""

  def __init__(self, state_dict: Mapping[str, Any], names: dict[str, str]):
    self._sd, self._names = state_dict, names

  def __getitem__(self, key: str) -> Any:
    return self._sd[self._names[key]]

  def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
    return key in self._names

  def __iter__(self) -> Iterator[str]:
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)


def _layout(state_dict: Mapping[str, Any]) -> dict[str, str]:
  """Where each part's keys live (the module docstring's table)."""
  if any(key.startswith(("language_model.", "vision_tower.", "multi_modal_projector.")) for key in state_dict):
    return dict(base="", lm_body="language_model.model.", lm_head="language_model.lm_head.weight")
  return dict(base="model.", lm_body="model.language_model.", lm_head="lm_head.weight")


def _indented(part: str, err: ValueError) -> str:
  return f"  {part}: " + "\n    ".join(str(err).splitlines())


def _describe(config: LlavaConfig) -> str:
  v, d = config.vision, config.decoder
  return (f"LlavaConfig(vision width={v.width} depth={v.depth} image_size={v.image_size} "
          f"patch_size={v.patch_size}; decoder width={d.width} depth={d.depth} vocab_size={d.vocab_size}; "
          f"vision_feature_layers={config.vision_feature_layers}, image_newline={config.image_newline})")


def llava_from_state_dict(state_dict: Mapping[str, Any], config: LlavaConfig) -> dict:
  """``Llava(config)`` params from a LLaVA / LLaVA-NeXT state_dict (torch tensors or numpy
  arrays, any of the module docstring's layouts) as float32 numpy arrays; the decoder's
  layers stacked when ``config.decoder.scan_layers``."""
  config = config.validate()
  if config.projector != "mlp2x":
    raise ValueError(f"config.projector={config.projector!r}; Hugging Face LLaVA checkpoints hold a two-layer "
                     "projector (linear_1, linear_2): expected 'mlp2x'")
  where = _layout(state_dict)
  base, body, head = where["base"], where["lm_body"], where["lm_head"]
  tower = base + "vision_tower."
  errors, params = [], {}
  try:
    params["vision"] = hf_vision.vit_from_state_dict(state_dict, config.vision, prefix=tower)
  except ValueError as err:
    errors.append(_indented("vision tower", err))

  # The LM's keys renamed to LlamaForCausalLM's, so hf_llama reads them.
  names = {"model." + key[len(body):]: key for key in state_dict if key.startswith(body)}
  if head in state_dict:
    names["lm_head.weight"] = head
  try:
    decoder = hf_llama.llama_from_state_dict(_Renamed(state_dict, names), config.decoder)
    params["decoder"] = hf_lm.finish_params(decoder, config.decoder) if config.decoder.scan_layers else decoder
  except ValueError as err:
    errors.append(_indented(f"language model (keys named as LlamaForCausalLM's: model.* is {body}*, "
                            f"lm_head.weight is {head})", err))

  reader = StateDictReader(state_dict, f"the projector and image_newline (under {base!r})")
  d, f = config.decoder.width, config.vision.width * len(config.vision_feature_layers)
  projector = base + "multi_modal_projector."
  params["projector"] = {}
  for name, d_in in (("linear_1", f), ("linear_2", d)):
    layer = {"kernel": reader.linear(f"{projector}{name}.weight", d, d_in)}
    if config.projector_bias:
      layer["bias"] = reader.get(f"{projector}{name}.bias", (d,))
    params["projector"][name] = layer
  if config.image_newline:
    params["image_newline"] = reader.get(base + "image_newline", (d,))
  lm_keys = set(names.values())
  unexpected = sorted(key for key in state_dict if key not in reader.used and key not in lm_keys
                      and not key.startswith(tower) and not key.endswith(_IGNORED_SUFFIXES))
  try:
    reader.raise_if_errors(unexpected)
  except ValueError as err:
    errors.append(_indented("projector", err))
  if errors:
    raise ValueError(f"cannot convert a LLaVA state_dict into {_describe(config)}:\n" + "\n".join(errors))
  return params


def _cast(tree: dict, dtype: np.dtype) -> dict:
  return {k: _cast(v, dtype) if isinstance(v, dict) else v.astype(dtype, copy=False) for k, v in tree.items()}


def llava_from_hf_directory(directory: str | os.PathLike, *, dtype: str = "float32",
                            **overrides) -> tuple[LlavaConfig, dict]:
  """(LlavaConfig, ``Llava`` params) of the LLaVA or LLaVA-NeXT model saved in ``directory`` by
  ``save_pretrained``: config.json and its weights (``mmjax.convert.hf_lm.open_state_dict``:
  safetensors or pytorch_model.bin, sharded or not, read one tensor at a time, without torch
  for safetensors). ``dtype``: of the returned arrays; ``overrides``: as
  ``llava_config_from_hf``'s.

  Raises ValueError for a model_type other than llava / llava_next (naming it), a missing
  config.json or weight file, or weights that disagree with config.json (one error listing
  every bad key).
  """
  directory = os.fspath(directory)
  config = llava_config_from_hf(hf_lm.read_hf_config(directory), **overrides)
  np_dtype = np.dtype(jnp.dtype(dtype))  # jnp knows bfloat16
  if not jnp.issubdtype(np_dtype, jnp.floating):
    raise ValueError(f"dtype={dtype!r}; expected a float dtype (float32, bfloat16, float16)")
  try:
    params = llava_from_state_dict(hf_lm.open_state_dict(directory), config)
  except ValueError as err:
    raise ValueError(f"{directory}: {err}") from err
  return config, _cast(params, np_dtype)
